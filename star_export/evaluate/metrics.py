"""What an answer costs: the VQA evaluation's answer normalisation, VQA accuracy, agreement, the first
token's KL.

``normalize`` applies the rules of the official VQA evaluation script (``vqaEval.py``, VQAv2), in
its order: newlines and tabs become spaces; then punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - >
< @ ` , ? !`` is deleted where it touches a space (``yes, it is``) or anywhere in a text holding a
digit-comma-digit (``1,000`` -> ``1000``), else replaced by a space (``black-and-white``); every ``.``
not followed by a digit is deleted (``3.5`` stays); then lower case, number words ``none``, ``zero``
.. ``ten`` become digits, the articles ``a``, ``an``, ``the`` go, and the script's contractions table
restores apostrophes (``dont`` -> ``don't``; ``it's`` stays as written). ``:``, ``'`` and other marks
not listed are kept, as the script keeps them.

``accuracy`` scores a prediction against a row's reference answers:

* several answers (VQAv2 gives ten, one per annotator): the VQA accuracy, min(#matching answers / 3,
  1) averaged over the leave-one-out subsets of the answers (the 10-choose-9 subsets for ten); with m
  of ten matching: 0.3, 0.6, 0.9 for m = 1, 2, 3 and 1 from m = 4;
* one answer: exact match after normalisation (1 or 0).

The references are normalised like the prediction (the official script only strips punctuation from
VQAv2's references, which were normalised when they were collected).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

VQA_ACCURACY, EXACT_MATCH = "vqa_accuracy", "exact_match"
NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# vqaEval.py's contractions, written without apostrophes (or with some) -> restored; the table's keys
# with capitals (Im, Ive, Id've, I'dve) are left out: the script looks words up after lower-casing.
_CONTRACTIONS = """
ain't=aint aren't=arent can't=cant could've=couldve couldn't=couldnt couldn't've=couldn'tve,couldnt've
didn't=didnt doesn't=doesnt don't=dont hadn't=hadnt hadn't've=hadnt've,hadn'tve hasn't=hasnt
haven't=havent he'd=hed he'd've=hed've,he'dve he's=hes how'd=howd how'll=howll how's=hows isn't=isnt
it'd=itd it'd've=itd've,it'dve it'll=itll let's=let's ma'am=maam mightn't=mightnt
mightn't've=mightnt've,mightn'tve might've=mightve mustn't=mustnt must've=mustve needn't=neednt
not've=notve o'clock=oclock oughtn't=oughtnt 'ow's'at=ow's'at,'ows'at,'ow'sat shan't=shant
she'd've=shed've,she'dve she's=she's should've=shouldve shouldn't=shouldnt
shouldn't've=shouldnt've,shouldn'tve somebodyd=somebody'd somebody'd've=somebodyd've,somebody'dve
somebody'll=somebodyll somebody's=somebodys someone'd=someoned someone'd've=someoned've,someone'dve
someone'll=someonell someone's=someones something'd=somethingd something'd've=somethingd've,something'dve
something'll=somethingll that's=thats there'd=thered there'd've=thered've,there'dve there're=therere
there's=theres they'd=theyd they'd've=theyd've,they'dve they'll=theyll they're=theyre they've=theyve
'twas=twas wasn't=wasnt we'd've=wed've,we'dve we've=weve weren't=werent what'll=whatll what're=whatre
what's=whats what've=whatve when's=whens where'd=whered where's=wheres where've=whereve who'd=whod
who'd've=whod've,who'dve who'll=wholl who's=whos who've=whove why'll=whyll why're=whyre why's=whys
won't=wont would've=wouldve wouldn't=wouldnt wouldn't've=wouldnt've,wouldn'tve y'all=yall
y'all'll=yall'll,y'allll y'all'd've=yall'd've,y'alld've,y'all'dve you'd=youd you'd've=youd've,you'dve
you'll=youll you're=youre you've=youve
"""
CONTRACTIONS = {
    written: restored
    for entry in _CONTRACTIONS.split()
    for restored, forms in [entry.split("=")]
    for written in forms.split(",")
}
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:  # each decided on the original text, as the script does
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or joined else " ")
    return _PERIOD.sub("", out)


def normalize(text: str) -> str:
    """An answer's comparable form, by the VQA evaluation's rules (see the module docstring)."""
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def agree(a: str, b: str) -> bool:
    """Two answers say the same after normalisation."""
    return normalize(a) == normalize(b)


def metric_of(answers: Sequence[str]) -> str:
    """The accuracy a row with these reference answers gets: VQA accuracy for several, exact match for one."""
    return VQA_ACCURACY if len(answers) > 1 else EXACT_MATCH


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The prediction's score against the reference ``answers`` (see the module docstring), in [0, 1]."""
    if not answers:
        raise ValueError("accuracy needs at least one reference answer")
    got = normalize(prediction)
    hits = [normalize(a) == got for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    matching = sum(hits)
    # leaving out answer i leaves matching - hits[i] matches among the others
    return sum(min(1.0, (matching - h) / 3) for h in hits) / len(hits)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row, in nats (float64; 0 for equal logits)."""
    lp, lq = log_softmax(reference), log_softmax(other)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def rate(flags: Sequence[bool]) -> float | None:
    """The fraction of True, None for no flags."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def mean(values: Sequence[float]) -> float | None:
    """The mean, None for no values."""
    return sum(values) / len(values) if values else None


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None
