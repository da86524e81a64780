"""
The writer interface, the registry of layouts, and the three ways a layout stores records
crash-safely: one set of files per image, lines appended to a text part, or a journal of
records from which the final file is built at the merge.
"""
import os
from typing import Dict, Iterator, List, Set

from .records import LayoutIdError, encode_npz, int_id
from .safety import LineLog, RecordJournal, new_part, part_path, replace_with_copy, write_atomically

LAYOUTS: Dict[str, type] = {}


def register_format(name: str):
    """Class decorator: register a :class:`Layout` as layout ``name``."""

    def register(cls):
        cls.name = name
        LAYOUTS[name] = cls
        return cls

    return register


class WriteOnlyLayoutError(ValueError):
    """Reading a layout that only the consumer's (pickle-loading) code reads."""


class Layout:
    """
    A layout: its writer (one instance per rank, which also tells what it holds) and its reader::

        writer = LAYOUTS[name](output_dir, rank, world_size)
        todo = [r for r in records if LAYOUTS[name].key(r["image_id"]) not in writer.written()]
        writer.write([dict(r, image_id=LAYOUTS[name].key(r["image_id"])) for r in todo])
        writer.close()
        # on rank 0, after every rank closed:
        LAYOUTS[name].merge(output_dir, world_size)
        records = LAYOUTS[name].read(os.path.join(output_dir, LAYOUTS[name].output_name))

    Records are the dicts of :mod:`d2_regionfeat.formats.records`; :meth:`write` gets them
    with ``image_id`` already the layout's key (:meth:`key`).
    """

    name = ""
    # Bumped whenever what a layout's files hold changes.
    version = 1
    # Where the layout lies in an output folder (file or folder).
    output_name = ""
    # Whether it holds images with no region (else they are left out and listed in
    # no_regions.jsonl): consumer code crashes on them, or averages over no rows.
    keeps_empty = False
    # Whether its reader takes integer image ids.
    int_ids = False
    # Whether it keeps every image's files in one folder (ids must not hold "/").
    flat = False
    # Whether its merge and reader take the model's names (``names=``: an object with
    # ``class_names`` and ``attribute_names``, each a list or None; None: no names at all).
    takes_names = False
    # Record keys it cannot do without, each with how to get it.
    needs: Dict[str, str] = {}
    # Whether it holds grid records (see :mod:`.grid`) rather than regions.
    grid = False

    def __init__(self, output_dir: str, rank: int, world_size: int):
        self.output_dir = output_dir
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def key(cls, image_id: str) -> str:
        """
        The id the layout stores for an image id.

        Raises:
            LayoutIdError: the layout cannot store this image id.
        """
        key = str(int_id(image_id)) if cls.int_ids else image_id
        if cls.flat and "/" in key:
            raise LayoutIdError(
                f"its files lie in one folder, and image id {image_id!r} holds a '/' "
                "(use --id int, or a flat input folder)"
            )
        return key

    def written(self) -> Set[str]:
        """Keys of the images this rank's part already holds."""
        raise NotImplementedError

    def write(self, records: List[Dict]):
        """Store ``records`` (new images, ``image_id`` their key), each atomically."""
        raise NotImplementedError

    def close(self):
        pass

    @classmethod
    def parts(cls, output_dir: str, world_size: int) -> List[str]:
        """The parts of every rank, in rank order."""
        return [part_path(output_dir, cls.name, r, world_size) for r in range(world_size)]

    @classmethod
    def merge(cls, output_dir: str, world_size: int):
        """Build the final output from the parts of all ranks (rank 0 only)."""

    @classmethod
    def reads_back(cls) -> bool:
        """Whether :meth:`read` reads the layout back (those holding pickles do not)."""
        return cls.read.__func__ is not Layout.read.__func__

    @classmethod
    def read(cls, path: str) -> Iterator[Dict]:
        """The records (with the keys the layout holds) of the layout at ``path``."""
        raise WriteOnlyLayoutError(
            f"the {cls.name} layout holds pickles (its readers' design) and d2_regionfeat does "
            "not read it back: unpickling runs code. Read the npz, hdf5 or lmdb of the run instead"
        )


class PerImageFilesLayout(Layout):
    """
    A folder ``<output>/<output_name>/`` of files per image, ``<key><suffix>`` for each of
    :attr:`suffixes`, each written to a temporary name and renamed; the last suffix is
    written last, so an image whose last file exists is whole. Nothing to merge.
    """

    suffixes = (".npz",)

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.folder = os.path.join(output_dir, self.output_name)
        self.tmp_suffix = f".{rank}.tmp"
        os.makedirs(self.folder, exist_ok=True)

    def files(self, record: Dict) -> List[bytes]:
        """The bytes of each of the image's files, in the order of :attr:`suffixes`."""
        raise NotImplementedError

    @classmethod
    def keys_in(cls, folder: str) -> List[str]:
        """Keys of the whole images in ``folder``, sorted."""
        last = cls.suffixes[-1]
        longer = [s for s in cls.suffixes[:-1] if s.endswith(last)]
        keys = []
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                if name.endswith(last) and not name.endswith(tuple(longer)):
                    rel = os.path.relpath(os.path.join(dirpath, name), folder)[: -len(last)]
                    keys.append(rel.replace(os.sep, "/"))
        return sorted(keys)

    def written(self):
        for dirpath, _, filenames in os.walk(self.folder):
            for name in filenames:
                if name.endswith(self.tmp_suffix):
                    os.remove(os.path.join(dirpath, name))  # a write this rank did not finish
        return set(self.keys_in(self.folder))

    def write(self, records):
        for record in records:
            path = os.path.join(self.folder, record["image_id"])
            for suffix, data in zip(self.suffixes, self.files(record)):
                write_atomically(path + suffix, data, self.tmp_suffix)


class LineLayout(Layout):
    """
    A text file of one line per image, its first tab-separated column the key: each rank
    appends lines to its part (:class:`LineLog`); the merge concatenates the parts into
    ``<output>/<output_name>``.
    """

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        path = new_part(output_dir, self.name, rank, world_size)
        self.log = LineLog(path, lambda line: line.split("\t", 1)[0])

    def line(self, record: Dict) -> bytes:
        """The image's line, with its newline."""
        raise NotImplementedError

    def written(self):
        return self.log.ids

    def write(self, records):
        self.log.append(self.line(r) for r in records)

    def close(self):
        self.log.close()

    @classmethod
    def merge(cls, output_dir, world_size):
        replace_with_copy(cls.parts(output_dir, world_size), os.path.join(output_dir, cls.output_name))


class JournalLayout(Layout):
    """
    A layout whose files do not survive a killed writer (HDF5, files with an index): each
    rank journals its records (:class:`RecordJournal`), and the merge builds the final
    files from the journals, in rank order, into temporary files that are then renamed.
    """

    def __init__(self, output_dir, rank, world_size):
        super().__init__(output_dir, rank, world_size)
        self.journal = RecordJournal(new_part(output_dir, self.name, rank, world_size))

    def written(self):
        return self.journal.ids

    def write(self, records):
        self.journal.append((r["image_id"], encode_npz(r)) for r in records)

    def close(self):
        self.journal.close()

    @classmethod
    def journaled(cls, output_dir: str, world_size: int, keys=None) -> Iterator[Dict]:
        """The records of every rank's journal (only ``keys``, if given), in rank order."""
        for part in cls.parts(output_dir, world_size):
            yield from RecordJournal.records(part, keys)
