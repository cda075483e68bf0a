"""Title and movieId lookup over a hand-made catalogue with MovieLens's awkward titles."""

import numpy as np
import pytest

from onerec_jax.data.catalogue import Catalogue, parse_queries, title_key
from onerec_jax.data.records import ItemInfo, split_title
from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import UserError

MOVIES = {  # movieId: raw title as in movies.csv
    1: "Toy Story (1995)",
    2: "Heat (1995)",
    3: "Heat (1986)",
    4: "Matrix, The (1999)",
    5: "Seven (a.k.a. Se7en) (1995)",
    6: "Lonely Movie (2001)",  # not trained
    7: "War of the Worlds (2005)",
    8: "War of the Worlds (2005)",  # the same title and year twice, both trained
    9: "Emma (1996)",
    10: "Emma (1996)",  # its duplicate, not trained
    11: "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
}
TRAINED = [1, 2, 3, 4, 5, 7, 8, 9, 11]  # dense ids 1..9 in this order


def _data(item_ids) -> SequenceData:
    n = len(item_ids)
    pad = np.array([""] if isinstance(item_ids[0], str) else [-1])
    return SequenceData(
        offsets=np.array([0, n]),
        items=np.arange(1, n + 1, dtype=np.int32),
        timestamps=np.arange(n),
        ratings=np.ones(n, np.float32),
        user_ids=np.array([42]),
        item_ids=np.concatenate([pad, np.asarray(item_ids)]),
        options={"min_rating": None, "min_user_interactions": 5, "min_item_interactions": 2},
    )


@pytest.fixture(scope="module")
def catalogue():
    titles, years = zip(*(split_title(t) for t in MOVIES.values()), strict=True)
    items = ItemInfo(
        np.array(list(MOVIES)),
        list(titles),
        np.array(years, np.int32),
        [("Drama",)] * len(MOVIES),
        [{}] * len(MOVIES),
    )
    return Catalogue(_data(TRAINED), items)


@pytest.mark.parametrize(
    "query, movie_id",
    [
        ("toy story", 1),
        (" TOY  STORY (1995) ", 1),
        ("Heat (1986)", 3),
        ("4", 4),
        ("The Matrix", 4),
        ("Matrix, The", 4),
        ("the matrix (1999)", 4),
        ("Se7en", 5),
        ("Seven", 5),
        ("Emma", 9),
        ("Emma (1996)", 9),
        ("City of Lost Children", 11),
        ("The City of Lost Children (1995)", 11),
        ("Cité des enfants perdus, La", 11),
    ],
)
def test_queries_resolve_to_the_trained_movie(catalogue, query, movie_id):
    assert catalogue.resolve(query) == TRAINED.index(movie_id) + 1


@pytest.mark.parametrize(
    "query, message",
    [
        (
            "Heat",
            r"'Heat' is ambiguous: Heat \(1995\) \[movieId 2\]; Heat \(1986\) \[movieId 3\]"
            r"\. Add the year or give the movieId",
        ),
        ("Heat (2010)", r"no movie 'Heat \(2010\)'; with that title: Heat \(1986\), Heat \(1995\)"),
        ("War of the Worlds", r"names several movies \(movieIds 7, 8\): give the movieId"),
        (
            "Lonely Movie",
            r"Lonely Movie \(2001\) \(movieId 6\) is not in the trained catalogue of "
            r"9 items: the run.s filters \(min_rating=None, .*interactions=2",
        ),
        ("6", r"Lonely Movie \(2001\) \(movieId 6\) is not in the trained catalogue"),
        ("12", r"movieId 12 is not in the dataset's movie list"),
        ("Matrx", r"no movie titled 'Matrx'\. Did you mean: Matrix, The \(1999\)\?"),
        ("heat 2", r"Did you mean: Heat \(1995\); Heat \(1986\)"),
        ("War", r"Did you mean: War of the Worlds \(2005\)\?"),  # a title twice: once
        ("Zzzzzz", r"^no movie titled 'Zzzzzz'\.$"),
    ],
)
def test_bad_queries_name_the_fix(catalogue, query, message):
    with pytest.raises(UserError, match=message):
        catalogue.resolve(query)


def test_labels_and_info(catalogue):
    dense = TRAINED.index(4) + 1
    assert catalogue.info(dense) == (4, "Matrix, The", 1999, ("Drama",))
    assert catalogue.label(dense) == "Matrix, The (1999)"
    assert title_key("  Matrix,  The ") == "the matrix"


def test_catalogues_without_titles_or_with_string_ids():
    bare = Catalogue(_data(TRAINED), None)
    assert bare.resolve("4") == 4 and bare.label(4) == "item 4" and bare.info(4)[1:] == ("", 0, ())
    with pytest.raises(UserError, match="no titles; give item ids"):
        bare.resolve("Heat")
    strings = Catalogue(_data(["a1", "b2", "c3"]), None)
    assert strings.resolve("b2") == 2 and strings.dense_id("zz") == 0


def test_parse_queries():
    values = ["Toy Story (1995); Heat;", "1, 260,2571", "Matrix, The", " "]
    assert parse_queries(values) == ["Toy Story (1995)", "Heat", "1", "260", "2571", "Matrix, The"]
