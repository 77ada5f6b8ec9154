"""Tweet-aware text normalisation, applied to each text just before tokenising.

Tweets carry tokens that a subword tokenizer turns into noise: a ``t.co`` link becomes a
dozen meaningless pieces, every ``@handle`` a different string of fragments, ``#legday``
becomes ``#``, ``leg``, ``##day`` at best, and emoji lost to a bad encoding leave runs of
``?`` that eat the token budget. Each rule below removes one such source of noise and can
be switched on alone, so the ablation can measure it:

* ``retweet``:    a leading ``RT @name:`` is removed: it names who was quoted, not a feeling.
* ``links``:      every link, truncated ones (``http:/…``, ``htt…``) included, becomes ``http``.
* ``mentions``:   ``@name`` becomes ``@user``: handles are arbitrary strings that cannot generalise.
* ``hashtags``:   ``#legday`` becomes ``leg day`` and ``#HardRockEdinburgh`` ``Hard Rock Edinburgh``: the
                  ``#`` goes, camel case, digit and ``_`` boundaries split first, then each piece that
                  ``wordninja`` (dynamic programming over English Wikipedia unigram frequencies) finds
                  to be several words is split. Known words and acronyms (``#DFW``) stay whole, and a
                  split that leaves a stray lower-case letter (``rugg`` → ``rug g``) is not taken.
                  Hashtags without a Latin letter or digit (``#好``) are left as they are.
* ``lost-emoji``: runs of two or more ``?`` (emoji lost in the data's encoding) become one ``?``.

Rules always run in the order above, whatever order they are given in (``retweet`` must see the
``@name`` before ``mentions`` rewrites it, and ``links`` must see a URL before its ``#`` or ``@``
is taken for a hashtag or mention), so a set of rules has exactly one meaning. Whitespace is
collapsed afterwards, as ``extract.dataset.decode_text`` does, so no rules at all is the identity
on texts read from a data folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_RETWEET = re.compile(r"^(?:RT\s*@[A-Za-z0-9_]+:?\s*)+")
# A full URL, or a URL the tweet's truncation cut to a prefix of "https://" followed by "…".
_LINK = re.compile(r"https?://\S*|(?<!\S)htt?(?:ps?:?/{0,2})?…")
_MENTION = re.compile(r"(?<![A-Za-z0-9_])@[A-Za-z0-9_]+")
_HASHTAG = re.compile(r"(?<!&)#([A-Za-z0-9_]+)")  # not "&#39;"-style HTML entities
_CASE_OR_DIGIT_BOUNDARY = re.compile(r"_+|(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")
_QUESTION_RUN = re.compile(r"\?{2,}")


def split_hashtag(body: str) -> list[str]:
    """The words of a hashtag body (without ``#``), original case kept: ``"legday"`` → ``["leg", "day"]``."""
    try:
        import wordninja  # imported here: it builds its 126k-word cost table on import (~0.3 s)
    except ImportError as error:
        raise ImportError(
            "normalisation rule 'hashtags' needs the package wordninja (pip install -r requirements.txt)"
        ) from error

    words: list[str] = []
    for piece in filter(None, _CASE_OR_DIGIT_BOUNDARY.split(body)):
        if piece.isupper():  # an acronym: "DFW" is not "D FW"
            words.append(piece)
            continue
        parts = wordninja.split(piece)
        stray_letter = any(len(part) == 1 and part.islower() and part not in "ai" for part in parts)
        words.extend([piece] if stray_letter else parts)
    return words


def _retweet(text: str) -> str:
    return _RETWEET.sub("", text)


def _links(text: str) -> str:
    return _LINK.sub(" http ", text)


def _mentions(text: str) -> str:
    return _MENTION.sub("@user", text)


def _hashtags(text: str) -> str:
    # A leading space only: tags glued to a word ("of#wonderful") come apart, punctuation stays attached.
    return _HASHTAG.sub(lambda match: " " + " ".join(split_hashtag(match.group(1))), text)


def _lost_emoji(text: str) -> str:
    return _QUESTION_RUN.sub("?", text)


# Rule name → rewrite, in the order the rules run.
_APPLY: dict[str, Callable[[str], str]] = {
    "retweet": _retweet, "links": _links, "mentions": _mentions, "hashtags": _hashtags, "lost-emoji": _lost_emoji,
}
RULES: tuple[str, ...] = tuple(_APPLY)
PRESETS: dict[str, tuple[str, ...]] = {"none": (), "all": RULES}


def resolve_rules(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Rule names in their fixed order from a preset (``"none"``, ``"all"``), ``"links,mentions"`` or a list.

    ``None`` means ``"none"``. The result is what encoders record, so equal sets of rules compare equal.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        if spec in PRESETS:
            return PRESETS[spec]
        spec = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in spec if name not in RULES]
    if unknown:
        raise ValueError(
            f"unknown normalisation rule(s) {unknown}; choose from {list(RULES)} or a preset {sorted(PRESETS)}"
        )
    return tuple(rule for rule in RULES if rule in spec)


def preprocessing_record(rules: tuple[str, ...]) -> dict[str, list[str]]:
    """The entry a text encoder adds to its ``preprocessing()``: the rules, or nothing when there are none.

    Leaving "none" out keeps the caches extracted before normalisation existed valid; any rule
    changes the features, so caches built with other rules are refused as mismatched.
    """
    return {"normalize": list(rules)} if rules else {}


def normalize_text(text: str, rules: str | Sequence[str] | None) -> str:
    """Apply ``rules`` (see ``resolve_rules``) in their fixed order, then collapse whitespace."""
    for rule in resolve_rules(rules):
        text = _APPLY[rule](text)
    return " ".join(text.split())
