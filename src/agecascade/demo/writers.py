"""Write synthetic faces in the native on-disk layouts of the five thesis datasets.

The dataset adapters are written against the real archives, so each writer mimics its
dataset's file names, label files and metadata formats exactly, including a few of the
real defects (bad labels, missing, empty, truncated and bogus files) that the cleaning
rules must catch. Everything is a pure function of the seed: no clocks, no hash order.
"""
from __future__ import annotations

import io
import struct
import zlib
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from .faces import Identity, render_face

JPEG_QUALITY = 90
IMDB_FILL = 1 / 1.8  # real IMDB crops are the face box plus a 40% margin on every side
MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, written by agecascade demo-data"
FEMALE = ("Anna", "Bella", "Clara", "Dora", "Elena", "Fiona", "Greta", "Helen", "Ida", "Julia",
          "Karen", "Lena", "Maria", "Nora", "Olivia", "Paula", "Rosa", "Sofia", "Tanja", "Vera")
MALE = ("Adam", "Bruno", "Carl", "David", "Erik", "Felix", "Georg", "Hugo", "Ivan", "Jonas",
        "Karl", "Leon", "Max", "Nils", "Oscar", "Peter", "Rolf", "Simon", "Tom", "Victor")
SURNAMES = ("Adler", "Berg", "Callas", "Dahl", "Eller", "Fischer", "Gray", "Hart", "Ivers",
            "Jansen", "Keller", "Lind", "Moreau", "Novak", "Olsen", "Price", "Quinn", "Reyes",
            "Stone", "Torres", "Unger", "Vidal", "Walsh", "Young", "Zimmer")
# Field order of the real imdb.mat struct; all are 1xN, the cell arrays hold strings or 1x4 boxes.
IMDB_FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_location",
               "face_score", "second_face_score", "celeb_names", "celeb_id")
IMDB_CELLS = ("full_path", "name", "face_location", "celeb_names")
ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
ADIENCE_MESSY = ("None", "35", "13", "22", "(38, 42)", "(27, 32)", "(8, 23)", "")
ADIENCE_HEADER = ("user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t"
                  "fiducial_yaw_angle\tfiducial_score")


# -- shared helpers -------------------------------------------------------------------------

def jpeg_bytes(image: Image.Image) -> bytes:
    """Encode with fixed settings and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _size(rng: np.random.Generator, lo: int, hi: int, portrait: float = 0.0) -> tuple[int, int]:
    """Random (width, height), up to ``portrait`` taller than wide."""
    width = int(rng.integers(lo, hi + 1))
    return width, min(hi, int(width * (1.0 + rng.uniform(0.0, portrait))))


def _people(rng: np.random.Generator, n: int) -> list[tuple[str, str, bool]]:
    """``n`` distinct (first name, surname, male) triples."""
    pool = [(f, s, male) for male, firsts in ((False, FEMALE), (True, MALE))
            for f in firsts for s in SURNAMES]
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims a huge greyscale image (a decompression bomb).

    Only four rows of pixel data are stored; decoders that trust IHDR would allocate
    ``width * height`` bytes, which is what Pillow's DecompressionBombError guards against.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(bytes((width + 1) * 4), 9)  # filter byte + pixels, 4 rows
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# -- IMDB -----------------------------------------------------------------------------------

def matlab_datenum(day: date) -> float:
    """MATLAB counts days from year 0, Python's ordinal from year 1."""
    return float(day.toordinal() + 366)


def _cell(items: list) -> np.ndarray:
    """A 1xN MATLAB cell array."""
    cell = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        cell[0, i] = item
    return cell


def _random_date(rng: np.random.Generator, first_year: int, last_year: int) -> date:
    start = date(first_year, 1, 1).toordinal()
    return date.fromordinal(int(rng.integers(start, date(last_year, 12, 31).toordinal() + 1)))


def _mat_bytes(name: str, fields: dict[str, np.ndarray]) -> bytes:
    """One 1x1 struct as a MAT v5 file, with scipy's timestamp header replaced."""
    record = np.empty((1, 1), dtype=[(key, object) for key in fields])
    for key, value in fields.items():
        record[0, 0][key] = value
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {name: record}, format="5")
    data = bytearray(buffer.getvalue())
    data[:116] = MAT_HEADER.ljust(116, b" ")
    return bytes(data)


def _imdb_defects(rng: np.random.Generator, n: int) -> dict[int, str]:
    """Row index -> the defect planted there; each cleaning rule gets ~4% of the rows."""
    share = round(0.04 * n)
    counts = {"no_face": share, "low_score": share, "second_face": share, "no_gender": share,
              "dob_future": share // 2, "dob_ancient": share - share // 2,
              "missing_file": 2, "truncated": 1}
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    return {int(row): kind for row, kind in zip(rng.permutation(n), kinds)}


def _imdb_photo(rng: np.random.Generator, crop_dir: Path, nm_id: int, rm_id: int, born: date,
                who: Identity, defect: str) -> dict[str, object]:
    """Render and write one photo; return its metadata with any planted defect applied."""
    age = int(rng.integers(0, min(100, 2014 - born.year) + 1))
    taken = born.year + age + (0 if born.month < 7 else 1)  # photos count as mid-year
    if defect == "dob_future":  # born after the photo: negative age
        born = born.replace(year=taken + int(rng.integers(1, 30)), day=min(born.day, 28))
    elif defect == "dob_ancient":  # over 100 years old at the photo
        born = born.replace(year=taken - int(rng.integers(102, 150)), day=min(born.day, 28))
    rel = f"{nm_id % 100:02d}/nm{nm_id:07d}_rm{rm_id}_{born.year}-{born.month}-{born.day}_{taken}.jpg"
    face = render_face(age, who, rng, _size(rng, 110, 200, portrait=0.15), IMDB_FILL)
    data = jpeg_bytes(face.image)
    if defect != "missing_file":
        _write(crop_dir / rel, data[: len(data) // 2] if defect == "truncated" else data)
    score = float(rng.uniform(1.0, 6.5))
    location = np.array([face.box], dtype=float) + 1.0  # MATLAB is 1-based
    if defect == "no_face":
        score, location = -np.inf, np.ones((1, 4))
    elif defect == "low_score":
        score = float(rng.uniform(0.0, 1.0))
    second = float(rng.uniform(0.5, 3.0)) if defect == "second_face" else np.nan
    return {"dob": matlab_datenum(born), "photo_taken": float(taken), "full_path": rel,
            "gender": np.nan if defect == "no_gender" else float(who.male),
            "face_location": location, "face_score": score, "second_face_score": second}


def write_imdb(root: Path, rng: np.random.Generator, n_rows: int = 800, n_celebs: int = 200) -> None:
    """``imdb_crop/imdb.mat`` plus ``imdb_crop/NN/nm..._rm..._Y-M-D_year.jpg`` face crops."""
    crop_dir = root / "imdb_crop"
    people = _people(rng, n_celebs)
    names = [f"{first} {last}" for first, last, _ in people]
    who = [Identity.random(rng, male=male) for _, _, male in people]
    celeb_names = sorted(names)
    celeb_id = {name: i + 1 for i, name in enumerate(celeb_names)}  # 1-based like MATLAB
    nm_ids = rng.choice(9_999_999, n_celebs, replace=False) + 1
    births = [_random_date(rng, 1915, 2005) for _ in range(n_celebs)]
    rm_ids = rng.choice(990_000_000, n_rows, replace=False) + 10_000_000
    defects = _imdb_defects(rng, n_rows)
    rows = []
    for row, celeb in enumerate(np.sort(rng.integers(0, n_celebs, n_rows))):
        photo = _imdb_photo(rng, crop_dir, int(nm_ids[celeb]), int(rm_ids[row]), births[celeb],
                            who[celeb], defects.get(row, ""))
        rows.append({**photo, "name": names[celeb], "celeb_id": float(celeb_id[names[celeb]])})
    columns = {key: [r[key] for r in rows] for key in IMDB_FIELDS if key != "celeb_names"}
    columns["celeb_names"] = celeb_names
    fields = {key: _cell(columns[key]) if key in IMDB_CELLS else np.array([columns[key]], dtype=float)
              for key in IMDB_FIELDS}
    _write(crop_dir / "imdb.mat", _mat_bytes("imdb", fields))


# -- AgeDB ----------------------------------------------------------------------------------

def write_agedb(root: Path, rng: np.random.Generator, n_people: int = 60) -> None:
    """Flat ``<id>_<Name>_<age>_<m|f>.jpg`` files, several ages per person."""
    shots = []
    for first, last, male in _people(rng, n_people):
        who, lo = Identity.random(rng, male=male), int(rng.integers(1, 60))
        hi = min(101, lo + int(rng.integers(25, 70)))
        n = int(rng.integers(5, 10))
        for age in np.sort(rng.choice(np.arange(lo, hi + 1), n, replace=False)):
            shots.append((first + last, "m" if male else "f", int(age), who))
    for i, (name, gender, age, who) in enumerate(shots):
        face = render_face(age, who, rng, _size(rng, 100, 200, portrait=0.3))
        _write(root / f"{i}_{name}_{age}_{gender}.jpg", jpeg_bytes(face.image))
    n, (name, gender, _, who) = len(shots), shots[0]
    face = render_face(30, who, rng, (150, 150))
    _write(root / f"{n}_NoAgeGiven_{gender}.jpg", jpeg_bytes(face.image))
    _write(root / "notes.txt", b"AgeDB demo copy. Ages were annotated manually.\n")
    _write(root / f"{n + 1}_{name}_40_{gender}.jpg", b"")  # empty download
    _write(root / f"{n + 2}_{name}_41_{gender}.jpg", png_bomb())


# -- FG-NET ---------------------------------------------------------------------------------

def pts_text(points: np.ndarray) -> str:
    """iBUG ``.pts`` landmark file."""
    body = "".join(f"{x:.3f} {y:.3f}\n" for x, y in points)
    return f"version: 1\nn_points: {len(points)}\n{{\n{body}}}\n"


def _old_scan(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Greyscale or sepia, like the scanned family photos that make up FG-NET."""
    grey = image.convert("L")
    if rng.random() < 0.5:
        return grey
    tone = np.asarray(grey, dtype=np.float32)[..., None] * [0.9, 0.75, 0.55] + [40, 30, 15]
    return Image.fromarray(np.clip(np.rint(tone), 0, 255).astype(np.uint8), "RGB")


def write_fgnet(root: Path, rng: np.random.Generator, n_subjects: int = 12) -> None:
    """``images/NNNAxx.JPG`` with ``points/nnnaxx.pts`` landmarks, ages 0..69 per subject."""
    shots = []  # (subject, age, identity)
    for subject in range(1, n_subjects + 1):
        who, n = Identity.random(rng), int(rng.integers(6, 11))
        shots += [(subject, int(a), who) for a in np.sort(rng.choice(70, n, replace=False))]
    special = rng.choice(len(shots), 7, replace=False)
    pairs, lower, no_pts, as_png = set(special[:3]), set(special[3:5]), special[5], special[6]
    for i, (subject, age, who) in enumerate(shots):
        stem = f"{subject:03d}A{age:02d}"
        for variant in ("a", "b") if i in pairs else ("",):
            name = (stem + variant).lower() + ".jpg" if i in lower else f"{stem}{variant}.JPG"
            face = render_face(age, who, rng, _size(rng, 120, 200, portrait=0.25))
            image = _old_scan(face.image, rng) if rng.random() < 0.3 else face.image
            _write(root / "images" / name, _png_bytes(image) if i == as_png else jpeg_bytes(image))
            if i != no_pts:
                _write(root / "points" / f"{(stem + variant).lower()}.pts",
                       pts_text(face.landmarks).encode())
    _write(root / "images" / "Thumbs.db", bytes([0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]))


# -- Adience --------------------------------------------------------------------------------

def _flickr_user(rng: np.random.Generator) -> str:
    return f"{rng.integers(10_000_000, 99_999_999)}@N{rng.integers(0, 8):02d}"


def _flickr_image(rng: np.random.Generator) -> str:
    secret = "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, 10))
    return f"{rng.integers(5_000_000_000, 12_000_000_000)}_{secret}_o.jpg"


def _adience_face(rng: np.random.Generator, root: Path, user: str, face_id: int, who: Identity,
                  group: tuple[int, int], label: str, has_image: bool) -> str:
    """Write one aligned face crop (unless it is meant to be missing); return its label row."""
    lo, hi = group
    original = _flickr_image(rng)
    gender = "u" if lo == 0 and rng.random() < 0.3 else ("m" if who.male else "f")
    box = rng.integers(0, 1500, 2).tolist() + rng.integers(200, 1400, 2).tolist()  # x y dx dy
    pose = [rng.integers(-120, 121), rng.integers(-45, 46), rng.integers(0, 200)]  # tilt yaw score
    if has_image:
        side = int(rng.integers(120, 201))
        face = render_face(rng.uniform(lo, hi), who, rng, (side, side))
        _write(root / "faces" / user / f"coarse_tilt_aligned_face.{face_id}.{original}",
               jpeg_bytes(face.image))
    return "\t".join(map(str, (user, original, face_id, label, gender, *box, *pose)))


def write_adience(root: Path, rng: np.random.Generator, users_per_fold: int = 4,
                  rows_per_user: int = 10) -> None:
    """``fold_k_data.txt`` label files and ``faces/<user>/coarse_tilt_aligned_face.*`` crops.

    Each Flickr user (album) belongs to one fold and holds 2-3 people of fixed age groups.
    """
    n_folds = 5
    n_users = n_folds * users_per_fold
    planted = rng.choice(n_users * rows_per_user, 2 * len(ADIENCE_MESSY) + 3, replace=False)
    messy = {int(r): k for k, r in enumerate(planted[:-3])}  # label k // 2, image if k even
    missing = set(planted[-3:].tolist())
    users = list(dict.fromkeys(_flickr_user(rng) for _ in range(2 * n_users)))[:n_users]
    for fold in range(n_folds):
        lines = [ADIENCE_HEADER]
        for u in range(fold * users_per_fold, (fold + 1) * users_per_fold):
            members = [(Identity.random(rng), ADIENCE_GROUPS[int(rng.integers(len(ADIENCE_GROUPS)))])
                       for _ in range(int(rng.integers(2, 4)))]
            for row in range(u * rows_per_user, (u + 1) * rows_per_user):
                who, group = members[int(rng.integers(len(members)))]
                label, has_image = f"({group[0]}, {group[1]})", row not in missing
                if row in messy:
                    label, has_image = ADIENCE_MESSY[messy[row] // 2], messy[row] % 2 == 0
                lines.append(_adience_face(rng, root, users[u], row + 1, who, group, label, has_image))
        _write(root / f"fold_{fold}_data.txt", ("\n".join(lines) + "\n").encode())


# -- UTKFace --------------------------------------------------------------------------------

def _utk_stamp(rng: np.random.Generator) -> str:
    """17-digit capture time, yyyymmddHHMMSSfff, within UTKFace's collection window."""
    when = datetime(2016, 12, 19) + timedelta(milliseconds=int(rng.integers(0, 33 * 86_400_000)))
    return when.strftime("%Y%m%d%H%M%S") + f"{when.microsecond // 1000:03d}"


def _utk_chip(age: int, male: bool, race: int, rng: np.random.Generator) -> bytes:
    who = Identity.random(rng, male=male, race=race)
    return jpeg_bytes(render_face(age, who, rng, (200, 200), 0.62).image)


def write_utkface(root: Path, rng: np.random.Generator, n_images: int = 400) -> None:
    """Flat ``<age>_<gender>_<race>_<datetime>.jpg.chip.jpg`` 200x200 aligned chips."""
    names: set[str] = set()
    while len(names) < n_images + 1:
        age, gender, race = int(rng.integers(1, 101)), int(rng.integers(2)), int(rng.integers(5))
        name = f"{age}_{gender}_{race}_{_utk_stamp(rng)}.jpg.chip.jpg"
        if name in names:
            continue
        names.add(name)
        if len(names) <= n_images:  # UTKFace: gender 0 = male, 1 = female
            _write(root / name, _utk_chip(age, gender == 0, race, rng))
        else:  # one undecodable file with a perfectly valid name
            _write(root / name, rng.bytes(3000))
    for age, gender, stamp in ((61, 1, "20170109142408075"), (39, 1, "20170116174525125")):
        _write(root / f"{age}_{gender}_{stamp}.jpg.chip.jpg",  # race missing
               _utk_chip(age, gender == 0, int(rng.integers(5)), rng))
    _write(root / "README.txt", b"UTKFace demo copy: age_gender_race_date&time.jpg.chip.jpg\n")


# -- all five -------------------------------------------------------------------------------

WRITERS = {"imdb": write_imdb, "agedb": write_agedb, "fgnet": write_fgnet,
           "adience": write_adience, "utkface": write_utkface}


def write_demo_datasets(out: Path, seed: int = 0) -> dict[str, int]:
    """Write all five synthetic datasets under ``out``; return files written per dataset.

    Each dataset draws from its own generator, seeded by (seed, dataset index), so its bytes
    depend only on the seed and not on which other datasets were written before it.
    """
    out = Path(out)
    for name in WRITERS:
        target = out / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} already exists and is not empty; "
                                  "remove it or choose another --out directory")
    counts = {}
    for index, (name, writer) in enumerate(WRITERS.items()):
        root = out / name
        root.mkdir(parents=True, exist_ok=True)
        writer(root, np.random.default_rng([seed, index]))
        counts[name] = sum(1 for p in root.rglob("*") if p.is_file())
    return counts
