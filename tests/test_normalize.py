"""Tweet-aware normalisation: each rule on examples, composition, and how text encoders record the rules."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MAX_TOKENS

from extract.cache import CacheMismatchError, FeatureCache, cache_path
from extract.dataset import read_text
from extract.normalize import PRESETS, RULES, normalize_text, resolve_rules, split_hashtag
from extract.registry import create_encoder, create_text_encoder
from extract.run import extract_features

# --- each rule alone --------------------------------------------------------------------------------------

EXAMPLES = {
    "retweet": [
        ("RT @AmitSwami77: The conspirators have an evil eye", "The conspirators have an evil eye"),
        ("RT @a_b: RT @c: nested retweet", "nested retweet"),
        ("RT @SnakeBytesTV Pied!!", "Pied!!"),  # no colon
        ("love this RT @x: not a prefix", "love this RT @x: not a prefix"),
    ],
    "links": [
        ("look http://t.co/o5xiKyJgT7 now", "look http now"),
        ("secure https://t.co/ZLzEDGGFRD", "secure http"),
        ("cut short http:/…", "cut short http"),
        ("cut shorter htt…", "cut shorter http"),
        ("cut mid-id http://t.co/Tn4hl…", "cut mid-id http"),
        ("#royalshttp://buff.ly/x glued", "#royals http glued"),
        ("an httpd server", "an httpd server"),
    ],
    "mentions": [
        ("@NYSE is looking a little despondent", "@user is looking a little despondent"),
        ('"@GracieSamuels: Don\'t wake up', '"@user: Don\'t wake up'),
        ("thanks @a and @B_2!", "thanks @user and @user!"),
        ("mail me at me@example.com", "mail me at me@example.com"),
    ],
    "hashtags": [
        ("#legday", "leg day"),
        ("#HardRockEdinburgh tonight", "Hard Rock Edinburgh tonight"),
        ("#happy", "happy"),
        ("#belligerent", "belligerent"),  # a known word stays whole
        ("#DFW", "DFW"),  # an acronym stays whole
        ("#Rugg", "Rugg"),  # "rug g" would leave a stray letter
        ("#1in7billion", "1 in 7 billion"),
        ("#colorsplash_bw", "color splash bw"),
        ("skin #smooth, #flawless!", "skin smooth, flawless!"),
        ("full of#wonderful #memories#JonStewart", "full of wonderful memories Jon Stewart"),
        ("#好 and &#39;", "#好 and &#39;"),
    ],
    "lost-emoji": [
        ("Look how cute this chicken is ??", "Look how cute this chicken is ?"),
        ("#Pumped ?????", "#Pumped ?"),
        ("a real question? yes?!", "a real question? yes?!"),
    ],
}


@pytest.mark.parametrize(
    ("rule", "text", "expected"), [(rule, text, out) for rule, pairs in EXAMPLES.items() for text, out in pairs]
)
def test_rule_on_example(rule, text, expected):
    assert normalize_text(text, [rule]) == expected


def test_every_rule_has_examples():
    assert set(EXAMPLES) == set(RULES)


def test_split_hashtag_keeps_the_case():
    assert split_hashtag("WeDemandSafety") == ["We", "Demand", "Safety"]
    assert split_hashtag("USmedia") == ["US", "media"]


# --- composition ------------------------------------------------------------------------------------------

TWEET = "RT @SavageOnIy: Look how cute #legday is ?? @bob http://t.co/CEPxKf3QlY"


def test_all_rules_compose():
    assert normalize_text(TWEET, "all") == "Look how cute leg day is ? @user http"


def test_rules_run_in_a_fixed_order_whatever_the_order_given():
    # retweet must run before mentions, or the prefix would already read "RT @user:".
    assert normalize_text(TWEET, ["mentions", "retweet"]) == normalize_text(TWEET, ["retweet", "mentions"])
    assert normalize_text(TWEET, "mentions,retweet").startswith("Look how cute")
    # links must run before hashtags and mentions, which would otherwise eat a URL's "#" or "@".
    url = "see https://example.com/a#frag?u=@x"
    assert normalize_text(url, ["hashtags", "mentions", "links"]) == "see http"


def test_none_is_the_identity_on_data_folder_texts(data_dir, data_spec):
    for guid in data_spec.guids:
        text = read_text(data_dir, guid)  # whitespace already collapsed
        for none in ("none", None, [], ""):
            assert normalize_text(text, none) == text


def test_whitespace_collapsed_after_the_rules():
    assert normalize_text("  a \n #legday\t", "none") == "a #legday"
    assert normalize_text("a http://t.co/x   b", ["links"]) == "a http b"


# --- rule specs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ()),
        (None, ()),
        ("all", RULES),
        ("mentions,links", ("links", "mentions")),
        (" links , lost-emoji ", ("links", "lost-emoji")),
        (["lost-emoji", "retweet", "retweet"], ("retweet", "lost-emoji")),
        ((), ()),
    ],
)
def test_resolve_rules(spec, expected):
    assert resolve_rules(spec) == expected


@pytest.mark.parametrize("spec", ["links,url", ["hashtag"], "everything"])
def test_unknown_rule_lists_the_choices(spec):
    with pytest.raises(ValueError, match="unknown normalisation rule") as info:
        resolve_rules(spec)
    assert str(list(RULES)) in str(info.value) and str(sorted(PRESETS)) in str(info.value)


# --- text encoders ----------------------------------------------------------------------------------------


def test_default_encoder_records_no_rules(tiny_text_encoder):
    assert tiny_text_encoder.options["normalize"] == []
    assert "normalize" not in tiny_text_encoder.preprocessing()  # caches from before normalisation stay valid


def test_encoder_records_its_rules(tiny_text_encoder_dir):
    encoder = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS, normalize="mentions,links")
    assert encoder.options == {"max_tokens": TINY_MAX_TOKENS, "normalize": ["links", "mentions"]}
    assert encoder.preprocessing()["normalize"] == ["links", "mentions"]
    description = encoder.describe()
    rebuilt = create_encoder("text", description["encoder"], **description["options"])  # as from a run folder
    assert rebuilt.describe() == description


def test_encoder_refuses_an_unknown_rule(tiny_text_encoder_dir):
    with pytest.raises(ValueError, match="unknown normalisation rule"):
        create_text_encoder(str(tiny_text_encoder_dir), normalize=["emoji"])


def test_collate_normalises(tiny_text_encoder, tiny_text_encoder_dir):
    normalising = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS, normalize="all")
    raw = "RT @someone: happy #legday ??? http://t.co/x"
    by_hand = tiny_text_encoder.collate(["happy leg day ? http"])["input_ids"]
    assert torch.equal(normalising.collate([raw])["input_ids"], by_hand)
    assert not torch.equal(tiny_text_encoder.collate([raw])["input_ids"], by_hand)


def test_cache_built_with_other_rules_is_refused(
    tiny_text_encoder, tiny_text_encoder_dir, data_dir, data_spec, tmp_path
):
    guids = data_spec.guids[:4]
    summary = extract_features(tiny_text_encoder, data_dir, tmp_path, guids=guids, num_workers=0, progress=False)
    normalising = create_text_encoder(str(tiny_text_encoder_dir), max_tokens=TINY_MAX_TOKENS, normalize=["hashtags"])
    assert cache_path(tmp_path, data_dir, "text", normalising.name) == summary.path  # same file, other features
    with pytest.raises(CacheMismatchError, match="preprocessing="):
        extract_features(normalising, data_dir, tmp_path, guids=guids, num_workers=0, progress=False)
    with pytest.raises(CacheMismatchError, match="preprocessing="), FeatureCache(
        summary.path, normalising.describe(), data_dir
    ):
        pass


def test_embedded_minilm_takes_the_option():
    encoder = create_text_encoder("minilm", max_tokens=12, normalize="hashtags")
    assert encoder.preprocessing()["normalize"] == ["hashtags"]
    # The reason for the rule: the tokenizer shatters the tag, but knows the words.
    assert encoder.tokenizer.tokenize("#legday") == ["#", "leg", "##day"]
    assert encoder.tokenizer.tokenize(normalize_text("#legday", encoder.normalize)) == ["leg", "day"]
