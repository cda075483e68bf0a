"""Every reader on small hand-written files of its layout, and its errors on malformed rows."""

import numpy as np
import pytest

from onerec_jax.data import generic, movielens
from onerec_jax.errors import DataFormatError


def _write(path, text, encoding="utf8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def ml25m_dir(tmp_path):
    d = tmp_path / "ml-25m"
    _write(
        d / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "1,2571,5.0,1000\n1,10,3.5,900\n2,10,4.0,1000\n2,3000,0.5,1000\n",
    )
    _write(
        d / "movies.csv",
        "movieId,title,genres\n"
        '10,"GoldenEye (1995)",Action|Adventure|Thriller\n'
        '2571,"Matrix, The (1999)",Action|Sci-Fi|Thriller\n'
        '3000,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)",Comedy|Romance\n'
        "4000,Untitled Film,(no genres listed)\n",
    )
    _write(
        d / "tags.csv",
        "userId,movieId,tag,timestamp\n"
        '1,2571,cyberpunk,5\n2,2571,Cyberpunk ,6\n2,2571,"philosophy, sort of",7\n'
        "1,10,bond,8\n",
    )
    _write(d / "links.csv", "movieId,imdbId,tmdbId\n10,0113189,710\n2571,0133093,603\n")
    _write(d / "genome-tags.csv", "tagId,tag\n1,007\n2,action\n")
    _write(
        d / "genome-scores.csv",
        "movieId,tagId,relevance\n10,1,0.99\n10,2,0.5\n2571,1,0.01\n2571,2,0.75\n",
    )
    return d


def test_movielens_csv_reads_every_file(ml25m_dir):
    raw = movielens.read_dataset(ml25m_dir)
    inter = raw.interactions
    np.testing.assert_array_equal(inter.users, [1, 1, 2, 2])
    np.testing.assert_array_equal(inter.items, [2571, 10, 10, 3000])
    np.testing.assert_array_equal(inter.ratings, np.float32([5.0, 3.5, 4.0, 0.5]))
    np.testing.assert_array_equal(inter.timestamps, [1000, 900, 1000, 1000])
    items = raw.items
    np.testing.assert_array_equal(items.item_ids, [10, 2571, 3000, 4000])
    assert items.titles == [
        "GoldenEye",
        "Matrix, The",
        "Amélie (Fabuleux destin d'Amélie Poulain, Le)",
        "Untitled Film",
    ]
    np.testing.assert_array_equal(items.years, [1995, 1999, 2001, 0])
    assert items.genres[1] == ("Action", "Sci-Fi", "Thriller") and items.genres[3] == ()
    # Tags are aggregated per item, case- and whitespace-insensitively, quoted commas kept.
    assert items.tags[1] == {"cyberpunk": 2, "philosophy, sort of": 1}
    assert items.tags[0] == {"bond": 1} and items.tags[2] == {}
    np.testing.assert_array_equal(items.genome_item_ids, [10, 2571])
    np.testing.assert_allclose(items.genome, [[0.99, 0.5], [0.01, 0.75]])
    assert items.genome_tags == ("007", "action")
    np.testing.assert_array_equal(items.genome_rows(np.array([2571, 3000, 10])), [1, -1, 0])
    np.testing.assert_array_equal(items.rows(np.array([3000, 99])), [2, -1])


def test_item_side_only_read_skips_ratings(ml25m_dir):
    (ml25m_dir / "ratings.csv").write_text("garbage that would not parse\n")
    raw = movielens.read_dataset(ml25m_dir, with_interactions=False)
    assert raw.interactions is None and len(raw.items) == 4


@pytest.mark.parametrize(
    "title, expected",
    [
        ("Matrix, The (1999)", ("Matrix, The", 1999)),
        ("Babylon 5 (1994-1998)", ("Babylon 5", 1994)),
        ("Stranger Things (2016-)", ("Stranger Things", 2016)),
        ("1984 (1984) ", ("1984", 1984)),
        ("Hyena Road", ("Hyena Road", 0)),
        ("Big Bang Theory (The)", ("Big Bang Theory (The)", 0)),
    ],
)
def test_split_title(title, expected):
    assert movielens.split_title(title) == expected


def test_movielens_dat_latin1_and_colons(tmp_path):
    d = tmp_path / "ml-1m"
    _write(
        d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    _write(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Star Wars: Episode I - The Phantom Menace (1999)::Action|Sci-Fi\n"
        "3::Misérables, Les (1995)::Drama|Musical\n",
        encoding="latin-1",
    )
    _write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    _write(d / "tags.dat", "15::661::space opera::1162160236\n")
    raw = movielens.read_dataset(d)
    np.testing.assert_array_equal(raw.interactions.users, [1, 1, 2])
    np.testing.assert_array_equal(raw.interactions.items, [1193, 661, 1193])
    np.testing.assert_array_equal(raw.interactions.ratings, [5, 3, 4])
    np.testing.assert_array_equal(raw.interactions.timestamps, [978300760, 978302109, 978298413])
    assert raw.items.titles == [
        "One Flew Over the Cuckoo's Nest",
        "Star Wars: Episode I - The Phantom Menace",
        "Misérables, Les",
    ]
    np.testing.assert_array_equal(raw.items.years, [1975, 1999, 1995])
    assert raw.items.genres[1] == ("Action", "Sci-Fi")
    assert raw.items.tags[1] == {"space opera": 1}
    np.testing.assert_array_equal(raw.users["age"], [1, 56])
    assert list(raw.users["gender"]) == ["F", "M"]


def test_movielens_100k(tmp_path):
    d = tmp_path / "ml-100k"
    _write(d / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags_242 = ["0"] * 19
    flags_242[5] = "1"  # Comedy
    flags_302 = ["0"] * 19
    flags_302[6] = flags_302[16] = "1"  # Crime, Thriller
    _write(
        d / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags_242) + "\n"
        "302|L.A. Confidential (1997)|01-Jan-1997||http://y|" + "|".join(flags_302) + "\n"
        "267|unknown||||" + "|".join(["1"] + ["0"] * 18) + "\n"
        "1300|Café au lait (1993)|01-Jan-1993||x|" + "|".join(["0"] * 19) + "\n",
        encoding="latin-1",
    )
    raw = movielens.read_dataset(d)
    np.testing.assert_array_equal(raw.interactions.users, [196, 186])
    np.testing.assert_array_equal(raw.interactions.items, [242, 302])
    assert raw.items.titles == ["Kolya", "L.A. Confidential", "unknown", "Café au lait"]
    np.testing.assert_array_equal(raw.items.years, [1996, 1997, 0, 1993])
    assert raw.items.genres == [("Comedy",), ("Crime", "Thriller"), (), ()]


def test_recbole_atomic_files(tmp_path):
    d = tmp_path / "rb"
    _write(
        d / "beauty.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "A1\tB07\t5.0\t1.5\nA2\tB01\t3.0\t1.25\nA1\tB01\t4.0\t1.5\n",
    )
    _write(
        d / "beauty.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\t"
        "genre:token_seq\nB01\tLip Balm\t2010\tCare Lips\nB07\tSoap\t\tCare\n",
    )
    raw = movielens.read_dataset(d)
    inter = raw.interactions
    assert list(inter.user_vocab[inter.users]) == ["A1", "A2", "A1"]
    assert list(inter.item_vocab[inter.items]) == ["B07", "B01", "B01"]
    np.testing.assert_array_equal(inter.ratings, [5.0, 3.0, 4.0])
    # Fractional times become their dense rank: order and ties kept.
    np.testing.assert_array_equal(inter.timestamps, [1, 0, 1])
    assert list(raw.items.item_ids) == ["B01", "B07"]
    assert raw.items.titles == ["Lip Balm", "Soap"]
    np.testing.assert_array_equal(raw.items.years, [2010, 0])
    assert raw.items.genres == [("Care", "Lips"), ("Care",)]


def test_recbole_numeric_ids_and_no_time(tmp_path):
    f = _write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t10\n1\t20\n2\t10\n")
    inter = movielens.read_dataset(f).interactions
    assert inter.user_vocab is None and inter.item_vocab is None
    np.testing.assert_array_equal(inter.items, [10, 20, 10])
    np.testing.assert_array_equal(inter.timestamps, [0, 1, 2])  # file order
    np.testing.assert_array_equal(inter.ratings, [1, 1, 1])


def test_recbole_untyped_header_is_rejected(tmp_path):
    f = _write(tmp_path / "x.inter", "user_id\titem_id\n1\t10\n")
    with pytest.raises(DataFormatError, match=r"x.inter, line 1: .*user_id:token"):
        movielens.read_dataset(f)


def test_user_sequence_text(tmp_path):
    f = _write(tmp_path / "Beauty.txt", "1 5 3 9\n2 3 5\n\n1 7\n")
    raw = movielens.read_dataset(f)
    inter = raw.interactions
    np.testing.assert_array_equal(inter.users, [1, 1, 1, 2, 2, 1])
    np.testing.assert_array_equal(inter.items, [5, 3, 9, 3, 5, 7])
    np.testing.assert_array_equal(inter.timestamps, np.arange(6))
    np.testing.assert_array_equal(raw.items.item_ids, [3, 5, 7, 9])
    assert generic.read_user_sequences(f).interactions.files == (str(f),)


def test_user_sequence_string_tokens(tmp_path):
    f = _write(tmp_path / "seq.txt", "u1 itemA itemB\nu2 itemB itemC\n")
    inter = movielens.read_dataset(f, "user_sequence").interactions
    assert list(inter.user_vocab[inter.users]) == ["u1", "u1", "u2", "u2"]
    assert list(inter.item_vocab[inter.items]) == ["itemA", "itemB", "itemB", "itemC"]


def test_user_sequence_line_without_items(tmp_path):
    f = _write(tmp_path / "seq.txt", "1 2 3\n4\n")
    with pytest.raises(DataFormatError, match=r"seq.txt, line 2: a user with no items"):
        movielens.read_dataset(f)


@pytest.mark.parametrize(
    "body, problem",
    [
        ("1,10,4.0,5\n1,10,4.0,5,9\n", r"line 3: expected 4 fields, found 5"),
        (
            "1,10,4.0,5\n1,abc,4.0,5\n",
            r"line 3: column 'movieId' should be an integer, found 'abc'",
        ),
        (
            "1,10,4.0,5\n1,10,,5\n1,10,4,5\n",
            r"line 3: column 'rating' should be a number, found ''",
        ),
        ("1,10\n", r"line 2: expected 4 fields, found 2"),
    ],
)
def test_malformed_rows_name_file_and_line(ml25m_dir, body, problem):
    path = ml25m_dir / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + body)
    with pytest.raises(DataFormatError, match="ratings.csv, " + problem):
        movielens.read_dataset(ml25m_dir)


def test_missing_header(ml25m_dir):
    (ml25m_dir / "ratings.csv").write_text("1,10,4.0,5\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv, line 1: expected the header"):
        movielens.read_dataset(ml25m_dir)


def test_skip_bad_rows_reports_count(ml25m_dir, caplog):
    (ml25m_dir / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,4.0,5\n1,abc,4.0,6\n2,10,4.0,5,9\n2,7,,3\n"
        "3,2571,2.5,7\n"
    )
    raw = movielens.read_dataset(ml25m_dir, on_bad_rows="skip")
    np.testing.assert_array_equal(raw.interactions.users, [1, 3])
    np.testing.assert_array_equal(raw.interactions.items, [10, 2571])
    np.testing.assert_array_equal(raw.interactions.ratings, [4.0, 2.5])
    assert "skipped 3 malformed rows" in caplog.text


def test_malformed_dat_row(tmp_path):
    d = tmp_path / "ml-1m"
    _write(d / "ratings.dat", "1::1193::5::978300760\n1::x::3::978302109\n")
    _write(d / "movies.dat", "1193::A (1975)::Drama\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat, line 2: column 'item'"):
        movielens.read_dataset(d)


def test_unknown_layout_and_format(tmp_path):
    with pytest.raises(DataFormatError, match="unknown layout"):
        movielens.read_dataset(tmp_path)
    with pytest.raises(DataFormatError, match="unknown data.format 'parquet'"):
        movielens.read_dataset(tmp_path, "parquet")
    with pytest.raises(DataFormatError, match="no such file or directory"):
        movielens.read_dataset(tmp_path / "absent")


def test_genome_unsorted_file_takes_the_general_path(ml25m_dir):
    # Same scores as the fixture, rows shuffled: the reshape fast path must not be taken.
    (ml25m_dir / "genome-scores.csv").write_text(
        "movieId,tagId,relevance\n2571,2,0.75\n10,1,0.99\n2571,1,0.01\n10,2,0.5\n"
    )
    items = movielens.read_dataset(ml25m_dir).items
    np.testing.assert_array_equal(items.genome_item_ids, [10, 2571])
    np.testing.assert_allclose(items.genome, [[0.99, 0.5], [0.01, 0.75]])


def test_genome_with_a_missing_score_is_an_error(ml25m_dir):
    (ml25m_dir / "genome-scores.csv").write_text(
        "movieId,tagId,relevance\n10,1,0.99\n10,2,0.5\n2571,1,0.01\n"
    )
    with pytest.raises(DataFormatError, match="1 \\(movie, tag\\) relevance values are missing"):
        movielens.read_dataset(ml25m_dir)


@pytest.mark.parametrize(
    "name, body, fmt, problem",
    [
        ("g.bin", bytes(range(256)) * 4, "auto", r"g.bin: a binary file"),
        ("g.bin", b"1 2 3\n\xff\xfe\x00\x1f\n", "user_sequence", r"g.bin: not utf8 text"),
        ("notes.txt", b"\nhello world\n", "auto", r"notes.txt, line 2: 'hello world' is not"),
        ("r.csv", b"userId,movieId,rating,timestamp\n", "auto", r"r.csv: a CSV of ratings"),
    ],
)
def test_a_file_in_no_layout_is_named_with_the_layouts(tmp_path, name, body, fmt, problem):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(DataFormatError, match=problem):
        movielens.read_dataset(tmp_path / name, fmt)
