"""The SCST CIDEr-D reward (eval.cider_reward) against pycocoevalcap's Cider: offline, CPU, fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from eval.cider_reward import CiderDReward, reward_tokens

#: Six images, 3-5 references each: lowercase, no punctuation (tokenisation plays no part).
CORPUS = {
    "a": ["a big red circle left of a small blue square",
          "a large red circle to the left of a small blue square",
          "red circle and blue square",
          "a big red circle beside a little blue square"],
    "b": ["a small green triangle above a big yellow diamond",
          "a green triangle over a yellow diamond",
          "a tiny green triangle above a large yellow diamond"],
    "c": ["a purple cross",
          "there is a purple cross",
          "just a purple plus sign",
          "a big purple cross",
          "a single purple cross in the image"],
    "d": ["a blue square below a red circle",
          "a small blue square under a big red circle",
          "blue square below red circle",
          "a blue square beneath a red circle"],
    "e": ["an orange diamond right of a green cross",
          "a large orange diamond to the right of a small green cross",
          "an orange diamond and a green cross"],
    "f": ["a yellow circle",
          "a small yellow circle",
          "a tiny yellow circle in the middle",
          "there is a yellow circle"],
}
#: Extra images that change the document frequencies (a corpus larger than the scored batch).
EXTRA = {
    "g": ["a red circle", "a big red circle", "one red circle"],
    "h": ["a red circle above a blue square", "red circle over blue square"],
    "i": ["a green square", "a small green square left of a red circle"],
    "j": ["a blue triangle", "there is a blue triangle"],
}
#: Several samples per image: copies of references, paraphrases, other images' captions, words
#: the corpus never saw, one and two words (every n-gram order and length-penalty case).
SAMPLES = {
    "a": ["a big red circle left of a small blue square", "a red circle", "circle",
          "a big red circle left of a big red circle left of a small blue square"],
    "b": ["a green triangle above a yellow diamond", "a purple cross", "triangle diamond",
          "a green zebra above a yellow giraffe"],
    "c": ["a purple cross", "a purple plus sign in the image", "a", "purple purple purple"],
    "d": ["a blue square below a red circle", "a red circle left of a blue square",
          "square under circle", "there is a blue square"],
    "e": ["an orange diamond to the right of a green cross", "orange diamond green cross",
          "a yellow circle", "an unseen word salad here"],
    "f": ["a yellow circle", "yellow", "a small yellow circle in the middle of the image",
          "a tiny yellow circle"],
}


def pycoco_scores(references: dict, samples: dict) -> dict:
    """Per image pycocoevalcap's CIDEr-D of its one sample, the idf over ``references``."""
    keys = list(references)
    _, scores = Cider().compute_score({k: list(references[k]) for k in keys},
                                      {k: [samples[k]] for k in keys})
    return dict(zip(keys, (float(s) for s in scores), strict=True))


def test_reward_equals_pycocoevalcap_cider_when_the_corpus_is_the_scored_references():
    reward = CiderDReward(CORPUS)
    for j in range(4):
        keys = list(CORPUS)
        captions = [SAMPLES[k][j] for k in keys]
        expected = pycoco_scores(CORPUS, dict(zip(keys, captions, strict=True)))
        got = reward(keys, captions)
        assert got.shape == (len(keys),) and got.dtype == np.float64
        np.testing.assert_allclose(got, [expected[k] for k in keys], rtol=0, atol=1e-9)
    # not a vacuous match: the samples span low and high scores
    assert reward(["a"], [CORPUS["a"][0]])[0] > 1.0 > reward(["a"], ["a red circle"])[0] > 0.0


def test_corpus_idf_differs_from_the_batch_idf_and_is_log_m_minus_log_df():
    batch = CiderDReward(CORPUS)
    corpus = CiderDReward({**CORPUS, **EXTRA})
    assert (batch.corpus_size, corpus.corpus_size) == (6, 10)
    gram = ("red", "circle")
    # images whose references contain "red circle": a, d in CORPUS; g, h, i in EXTRA
    assert batch.document_frequency[gram] == 2 and corpus.document_frequency[gram] == 5
    assert corpus.idf(gram) == pytest.approx(math.log(10) - math.log(5), abs=1e-12)
    assert batch.idf(gram) == pytest.approx(math.log(6) - math.log(2), abs=1e-12)
    assert corpus.idf(("zebra",)) == pytest.approx(math.log(10))  # unseen: max(1, 0)
    # and the reward uses it: pycocoevalcap scoring all ten images has the corpus idf
    keys = list(CORPUS)
    captions = [SAMPLES[k][1] for k in keys]
    everything = {**CORPUS, **EXTRA}
    expected = pycoco_scores(everything, {**dict(zip(keys, captions, strict=True)),
                                          **{k: refs[0] for k, refs in EXTRA.items()}})
    got = corpus(keys, captions)
    np.testing.assert_allclose(got, [expected[k] for k in keys], rtol=0, atol=1e-9)
    assert np.abs(got - batch(keys, captions)).max() > 1e-3


def test_reward_tokens_lowercases_and_drops_ptb_punctuation():
    assert reward_tokens("A Red circle, left of a square.") == "a red circle left of a square"
    assert reward_tokens('  "Two"   shapes -- a cross; (small) ... ') == "two shapes a cross small"
    assert reward_tokens("A man's t-shirt, 3.5 inches!") == "a man's t-shirt 3.5 inches"
    assert reward_tokens("?!.") == ""


def test_references_and_samples_are_tokenised_alike():
    shouting = {k: [r.capitalize() + "." for r in refs] for k, refs in CORPUS.items()}
    keys = list(CORPUS)
    captions = [SAMPLES[k][0] for k in keys]
    plain = CiderDReward(CORPUS)(keys, captions)
    np.testing.assert_allclose(CiderDReward(shouting)(keys, captions), plain, rtol=0, atol=1e-12)
    np.testing.assert_allclose(CiderDReward(CORPUS)(keys, [c.upper() + "!" for c in captions]),
                               plain, rtol=0, atol=1e-12)


def test_several_samples_of_one_key_in_any_order_score_as_one_by_one():
    reward = CiderDReward({**CORPUS, **EXTRA})
    pairs = [(k, c) for k in ("a", "c", "a", "e") for c in SAMPLES[k]]
    alone = np.array([reward([k], [c])[0] for k, c in pairs])
    assert len(set(alone.round(9))) > 8  # distinct scores, so a mix-up would show
    order = np.random.default_rng(0).permutation(len(pairs))
    together = reward([pairs[i][0] for i in order], [pairs[i][1] for i in order])
    np.testing.assert_array_equal(together, alone[order])


def test_unknown_key_raises_naming_it_and_an_empty_caption_scores_zero():
    reward = CiderDReward(CORPUS)
    with pytest.raises(KeyError, match="'zebra'"):
        reward(["a", "zebra"], ["a red circle", "a zebra"])
    np.testing.assert_array_equal(reward(["a", "c"], ["", " , . "]), [0.0, 0.0])
    with pytest.raises(ValueError, match="2 keys but 1 captions"):
        reward(["a", "b"], ["a red circle"])
    with pytest.raises(ValueError, match="no reference"):
        CiderDReward({"a": CORPUS["a"], "b": []})


def test_leave_one_out_scores_each_reference_against_the_others_with_the_corpus_idf():
    reward = CiderDReward(CORPUS)
    for key, refs in CORPUS.items():
        others = reward.with_references({j: [r for i, r in enumerate(refs) if i != j]
                                         for j in range(len(refs))})
        expected = others(list(range(len(refs))), refs)  # (R,)
        np.testing.assert_allclose(reward.leave_one_out(key), expected, rtol=1e-12)
    assert reward.leave_one_out("a").argmax() != 2  # "red circle and blue square" is the odd one
    single = CiderDReward({"x": ["a red circle"], **CORPUS})
    assert single.leave_one_out("x").tolist() == [0.0]
