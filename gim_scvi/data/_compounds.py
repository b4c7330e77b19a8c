"""The shipped sci-Plex 3 compound table and robust compound-name matching.

Source of ``sciplex3_compounds.csv``: theislab/chemCPA ``embeddings/trapnell_drugs_smiles.csv``
(MIT License, commit 5cbd04d, 2022-01-18; header line added). Compounds from Srivatsan et al.,
Science 367:45 (2020).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from importlib.resources import files

import pandas as pd

# salt / solvate words dropped before matching ("Givinostat HCl", "... hydrochloride hydrate")
_SALTS = (
    "dihydrochloride",
    "hydrochloride",
    "hydrobromide",
    "dimesylate",
    "mesylate",
    "maleate",
    "fumarate",
    "tartrate",
    "citrate",
    "phosphate",
    "sulfate",
    "succinate",
    "tosylate",
    "besylate",
    "acetate",
    "lactate",
    "sodium",
    "potassium",
    "calcium",
    "hydrate",
    "monohydrate",
    "dihydrate",
    "trihydrate",
    "2hcl",
    "3hcl",
    "hcl",
    "hbr",
    "salt",
    "free base",
    "racemic",
)
_BRACKETS = re.compile(r"[\(\[]([^\)\]]*)[\)\]]")
# names in the shipped table that differ from the vendor's product name beyond salts/aliases
_ALIASES = {
    "auroraainhibitori": "Aurora",  # Aurora A Inhibitor I
    "phenylbutyrate": "Sodium",  # Sodium Phenylbutyrate
}


@cache
def sciplex3_compounds() -> pd.DataFrame:
    """The 187 sci-Plex 3 compounds (``name``, ``smiles``, ``pathway``), vehicle rows excluded."""
    path = files("gim_scvi.data").joinpath("sciplex3_compounds.csv")
    with path.open() as handle:
        table = pd.read_csv(handle, dtype=str, keep_default_na=False)
    return table[table["name"] != "control"].reset_index(drop=True)


def normalize_name(name: str) -> str:
    """Lower-case name without salts, bracketed aliases or punctuation."""
    text = _BRACKETS.sub(" ", str(name).lower())
    return _strip_salts(text)


def _strip_salts(text: str) -> str:
    plain = re.sub(r"[^a-z0-9]", "", text)
    words = re.split(r"[\s,;/]+", text.strip())
    while words and words[-1] in _SALTS:
        words.pop()
    joined = " ".join(words)
    for salt in _SALTS:
        joined = re.sub(rf"\b{re.escape(salt)}\b", " ", joined)
    stripped = re.sub(r"[^a-z0-9]", "", joined)
    return stripped or plain  # a name that is only a salt word ("Sodium") stays itself


def _first_word(name: str) -> str:
    """The vendor name's first word (``name.split(" ")[0]``), chemCPA's short name.

    chemCPA built the shipped table's names this way (``"Trichostatin A (TSA)"`` ->
    ``"Trichostatin"``, ``"(+)-JQ1"`` -> ``"JQ1"`` once normalised).
    """
    return str(name).strip().split(" ")[0]


def _candidates(name: str) -> list[str]:
    """Normalised forms of ``name`` to try, in order of preference.

    Parameters
    ----------
    name
        A compound name.

    Returns
    -------
    list of str
        The name without brackets, then each bracketed alias; empty and repeated forms left
        out.
    """
    out = [normalize_name(name)]
    out += [_strip_salts(alias.lower()) for alias in _BRACKETS.findall(str(name))]
    return list(dict.fromkeys(c for c in out if c))


def match_compounds(
    names: Iterable[str], table: pd.DataFrame | None = None
) -> tuple[dict[str, str], list[str]]:
    """Match compound names to the compound table robustly.

    Case, punctuation, salts (``HCl``, ``mesylate``, ...) and bracketed aliases
    (``"Givinostat (ITF2357)"``) are tolerated; either the main name or an alias may match.
    As a last resort the name's first word is tried, the rule chemCPA used to name the
    shipped table (``"Trichostatin A (TSA)"`` -> ``"Trichostatin"``, ``"ZM 447439"`` ->
    ``"ZM"``), so a match of the full name or an alias always wins.

    Parameters
    ----------
    names
        Compound names as they appear in a data set.
    table
        Compound table with a ``name`` column (default: :func:`sciplex3_compounds`).

    Returns
    -------
    matched : dict
        Each matched input name mapped to the table's name.
    unmatched : list
        The input names that matched nothing.
    """
    matched, unmatched, _ = match_compounds_by_rule(names, table)
    return matched, unmatched


def match_compounds_by_rule(
    names: Iterable[str], table: pd.DataFrame | None = None
) -> tuple[dict[str, str], list[str], list[str]]:
    """:func:`match_compounds`, also saying which names matched only by their first word.

    A first-word match is the weakest evidence (``"ZM 336372"`` would take the table's
    ``"ZM"``, which is ZM 447439), so readers report those names for the user to check.

    Returns
    -------
    matched : dict
        Each matched input name mapped to the table's name.
    unmatched : list
        The input names that matched nothing.
    by_first_word : list
        The matched input names whose full name and bracketed aliases matched nothing.
    """
    lookup = _name_lookup(sciplex3_compounds() if table is None else table)
    matched, unmatched, by_first_word = {}, [], []
    for name in dict.fromkeys(map(str, names)):
        hit = next((lookup[c] for c in _candidates(name) if c in lookup), None)
        if hit is None:  # chemCPA's first-word rule, the last resort
            hit = lookup.get(normalize_name(_first_word(name)))
            if hit is not None:
                by_first_word.append(name)
        if hit is None:
            unmatched.append(name)
        else:
            matched[name] = hit
    return matched, unmatched, by_first_word


def _name_lookup(table: pd.DataFrame) -> dict[str, str]:
    """Normalised name or alias -> the table's name (the first entry wins)."""
    lookup: dict[str, str] = {}
    for canonical in table["name"]:
        for key in _candidates(canonical):
            lookup.setdefault(key, canonical)
    for alias, canonical in _ALIASES.items():
        if canonical in set(table["name"]):
            lookup.setdefault(alias, canonical)
    return lookup
