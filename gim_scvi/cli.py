"""The ``gim-scvi`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SMALL_DEMO = {
    "n_drugs": 10,
    "n_heldout_drugs": 2,
    "n_validation_drugs": 1,
    "n_cell_lines": 2,
    "doses": (10.0, 1000.0),
    "cells_per_condition": 8,
    "control_cells_per_line": 60,
    "n_genes": 80,
    "n_programs": 3,
    "n_features": 8,
}


def _setup_synthetic(adata) -> None:
    """Register a :func:`gim_scvi.data.synthetic` screen with :class:`gim_scvi.GIM`."""
    import gim_scvi

    gim_scvi.GIM.setup_anndata(
        adata,
        features_key="drug_features",
        control_key="control",
        dose_key="dose",
        perturbation_key="condition",
        cell_line_key="cell_line",
    )


def _demo(args: argparse.Namespace) -> int:
    import scvi

    import gim_scvi

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scvi.settings.seed = args.seed
    print(f"gim_scvi {gim_scvi.__version__}: demo on the built-in synthetic screen")
    t0 = time.perf_counter()
    size = SMALL_DEMO if args.small else {}
    adata = gim_scvi.data.synthetic(seed=args.seed, **{"n_genes": args.n_genes, **size})
    split = adata.obs["split"].value_counts()
    print(
        f"data: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{adata.obs['condition'].nunique() - 1} drugs x "
        f"{adata.obs.loc[~adata.obs['control'], 'dose'].nunique()} doses x "
        f"{adata.obs['cell_line'].nunique()} cell lines "
        f"(cells: {split.get('train', 0)} train, {split.get('valid', 0)} validation, "
        f"{split.get('test', 0)} held-out drugs); simulated in {time.perf_counter() - t0:.1f} s"
    )
    _setup_synthetic(adata)
    model = gim_scvi.GIM(adata, n_programs=args.n_programs)
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        split_key="split",
        validation_split="valid",
        enable_progress_bar=not args.quiet,
    )
    train_time = time.perf_counter() - t0
    print(f"training: {args.epochs} epochs in {train_time:.1f} s; graph {model.graph_pruning_}")
    _print_ensemble_choice(model)
    _print_neighbour_choice(model)

    t0 = time.perf_counter()
    results = gim_scvi.tl.evaluate(model, adata, split_key="split", heldout="test")
    summary = gim_scvi.tl.summarize(results)
    print(f"\nheld-out drugs, predicted and scored in {time.perf_counter() - t0:.1f} s:")
    _print_summary(summary)
    _print_comparison(results)

    recovery = gim_scvi.tl.ground_truth_recovery(model, adata)
    print("\nrecovery of the true mechanism (programs matched by loadings):")
    for key, value in recovery.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")

    if args.n_combinations > 0:
        _demo_combinations(model, args, size)

    targets = model.get_intervention_targets().groupby(level="condition").mean()
    heldout = adata.uns["ground_truth"]["drugs"]["split"]
    heldout = [d for d in targets.index if heldout.get(d) == "test"]
    print("\ntop inferred targets of the held-out drugs (probability):")
    for drug in heldout:
        top = targets.loc[drug].sort_values(ascending=False).head(3)
        print(f"  {drug}: " + ", ".join(f"{p} {v:.2f}" for p, v in top.items()))

    gim_scvi.tl.annotate(model, adata, key_added="gim")
    _write_tables(out, results, summary)
    adata.write_h5ad(out / "demo_annotated.h5ad")
    model.save(str(out / "model"), overwrite=True)
    combos = ", combination_metrics.csv" if args.n_combinations > 0 else ""
    print(
        f"\nwrote {out}/heldout_metrics.csv, heldout_summary.csv, heldout_scores.png{combos}, "
        "demo_annotated.h5ad, model/"
    )
    return 0


def _demo_combinations(model, args: argparse.Namespace, size: dict) -> None:
    """Score pairs of training drugs applied together (never seen as pairs) vs additivity."""
    import gim_scvi

    t0 = time.perf_counter()
    # the same screen with pairs of training drugs added: its single-drug cells are identical
    combos = gim_scvi.data.synthetic(
        seed=args.seed,
        n_combinations=args.n_combinations,
        **{"n_genes": args.n_genes, **size},
    )
    _setup_synthetic(combos)
    results = gim_scvi.tl.evaluate(model, combos, split_key="split", heldout="combo")
    print(
        f"\n{args.n_combinations} pairs of training drugs given together (never seen in "
        f"training), scored in {time.perf_counter() - t0:.1f} s:"
    )
    _print_summary(gim_scvi.tl.summarize(results))
    results.to_csv(Path(args.out) / "combination_metrics.csv", index=False)


SUMMARY_COLUMNS = {
    "r2_all_mean": "R2 all",
    "r2_deg_mean": "R2 DEG",
    "r2_deg_median": "R2 DEG med",
    "pearson_delta_deg_mean": "Pearson d DEG",
    "energy_distance_mean": "energy dist",
}


def _print_ensemble_choice(model) -> None:
    """One line on which kind of ensemble member predicts unseen drugs (if it was chosen)."""
    table = getattr(model, "ensemble_selection_", None)
    if table is None or len(table) < 2:
        return
    chosen = table.loc[table["chosen"]].iloc[0]
    names = {"0": "linear maps", "1": "MLPs"}
    scores = ", ".join(
        f"{names.get(m, m + ' hidden layers') if '+' not in m else 'all'} {v:.3f}"
        for m, v in zip(table["member_layers"], table["r2_deg"], strict=True)
    )
    layers = chosen["member_layers"]
    kind = "all members" if "+" in layers else names.get(layers, f"{layers} hidden layers")
    print(
        f"generator ensemble: {kind}, chosen on {int(chosen['n_conditions'])} validation "
        f"conditions (DEG-R² {scores})"
    )


def _print_neighbour_choice(model) -> None:
    """One line on how much unseen drugs borrow from similar seen ones (if it was chosen)."""
    table = getattr(model, "neighbour_selection_", None)
    if table is None:
        return
    chosen = table.loc[table["chosen"]].iloc[0]
    mixed = table[table["weight"] > 0]
    best = mixed.loc[mixed["r2_deg"].idxmax()] if len(mixed) else None
    where = f"on {int(chosen['n_conditions'])} validation conditions"
    if chosen["weight"] == 0:
        other = "" if best is None else f"; best with neighbours {best['r2_deg']:.3f}"
        print(
            "unseen drugs: the generator ensemble alone, chosen "
            f"{where} (DEG-R² {chosen['r2_deg']:.3f}{other})"
        )
        return
    print(
        f"unseen drugs borrow {chosen['weight']:.0%} of their intervention from similar "
        f"training drugs (temperature {chosen['temperature']:g}), chosen {where}: DEG-R² "
        f"{chosen['r2_deg']:.3f} (ensemble alone {table.loc[0, 'r2_deg']:.3f})"
    )


def _print_summary(summary: pd.DataFrame) -> None:
    """Print the evaluation summary as one table (mean over conditions unless 'med')."""
    table = summary[["doses", "method", *SUMMARY_COLUMNS]].rename(columns=SUMMARY_COLUMNS)
    table = table.sort_values(["doses", "method"], ascending=[False, True])
    print(table.to_string(index=False, na_rep="n/a", float_format=lambda v: f"{v:.3f}"))
    print(
        "(log1p-normalised means over held-out conditions; DEG = top 50 genes vs the line's "
        "controls;\n the control mean predicts no change, so its Pearson of deltas is "
        "undefined; lower energy distance is better)"
    )
    for _, row in summary.drop_duplicates("doses").iterrows():
        if row["n_r2_deg"] < row["n_conditions"]:
            print(
                f"DEG-R² ({row['doses']}) is undefined for {row['n_conditions'] - row['n_r2_deg']}"
                f" of {row['n_conditions']} conditions, whose top DEGs all have one observed "
                "mean (usually genes detected in none of a small condition's cells); the "
                "DEG-R² columns summarise the others."
            )


def _print_comparison(results: pd.DataFrame) -> None:
    """GIM minus each baseline at the highest dose, with cluster-bootstrap intervals."""
    import gim_scvi

    parts = []
    for metric, label in (("r2_deg", "R2 DEG"), ("pearson_delta_deg", "Pearson d DEG")):
        table = gim_scvi.tl.compare(results, metric=metric)
        if table.empty:
            continue
        table.insert(0, "metric", label)
        parts.append(table)
    if not parts:
        return
    table = pd.concat(parts)
    shown = pd.DataFrame(
        {
            "metric": table["metric"],
            "baseline": table["method"],
            "GIM - baseline": table["difference"].map("{:+.3f}".format),
            "95% interval": [
                f"[{lo:+.3f}, {hi:+.3f}]"
                for lo, hi in zip(table["ci_low"], table["ci_high"], strict=True)
            ],
            "P(GIM ahead)": table["p_reference_better"].map("{:.2f}".format),
        }
    )
    print(
        "\nGIM against each baseline at the highest dose (paired conditions; interval and "
        "P from resampling whole held-out perturbations):"
    )
    print(shown.to_string(index=False))


def _write_tables(out: Path, results: pd.DataFrame, summary: pd.DataFrame) -> None:
    """Per-condition metrics and their summary as CSV files in ``out``, and their figure."""
    results.to_csv(out / "heldout_metrics.csv", index=False)
    summary.to_csv(out / "heldout_summary.csv", index=False)
    _write_scores_figure(out / "heldout_scores.png", results)


def _write_scores_figure(path: Path, results: pd.DataFrame) -> None:
    """DEG-R² and Pearson of changes per method at the highest dose (no display needed)."""
    from matplotlib.figure import Figure

    import gim_scvi

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("r2_deg", "pearson_delta_deg"), strict=True):
        if results[metric].notna().any():
            gim_scvi.pl.evaluation(results, metric=metric, clip_lower=-1.0, ax=ax, show=False)
        else:  # e.g. DEGs all undefined on a tiny data set
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{metric}: no defined value", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _evaluate(args: argparse.Namespace) -> int:
    import anndata as ad

    import gim_scvi

    adata = ad.read_h5ad(args.data)
    model = gim_scvi.GIM.load(args.model, adata=adata)
    t0 = time.perf_counter()
    results = gim_scvi.tl.evaluate(
        model,
        adata,
        split_key=args.split_key,
        heldout=args.heldout,
        train_split=args.train,
        degs=args.degs,
    )
    summary = gim_scvi.tl.summarize(results)
    print(
        f"{args.data}: held-out '{args.heldout}' scored in {time.perf_counter() - t0:.1f} s "
        f"(DEGs: {args.degs})"
    )
    _print_summary(summary)
    _print_comparison(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tables(out, results, summary)
    print(f"wrote {out}/heldout_metrics.csv, heldout_summary.csv, heldout_scores.png")
    return 0


def _without_compounds_lacking_smiles(adata):
    """The cells of ``adata`` except treated ones whose compound has no SMILES (said so)."""
    lacking = ~adata.obs["control"].to_numpy() & (adata.obs["smiles"].astype(str) == "").to_numpy()
    if not lacking.any():
        return adata
    names = sorted(set(adata.obs["condition"].astype(str)[lacking]))
    print(
        f"left out {int(lacking.sum())} cells of {len(names)} compound(s) without a SMILES "
        f"(not in the shipped table nor the file): {names[:10]}"
    )
    return adata[~lacking].copy()


def _highly_variable_genes(adata, layer, likelihood: str, n_top_genes: int, seed: int):
    """``adata`` on its ``n_top_genes`` most variable genes, if it has more (said so).

    scanpy's ``highly_variable_genes`` on log-normalised expression of at most 50,000
    randomly chosen cells, so that a whole-transcriptome file (pertpy's has ~58,000 human
    genes) is never copied whole.
    """
    import scanpy as sc

    import gim_scvi

    if n_top_genes <= 0 or adata.n_vars <= n_top_genes:
        return adata
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(adata.n_obs, min(adata.n_obs, 50_000), replace=False))
    x = adata.X if layer is None else adata.layers[layer]
    x = x[cells]
    expression = x if likelihood == "normal" else gim_scvi.tl.lognorm(x)
    sample = sc.AnnData(expression, var=pd.DataFrame(index=adata.var_names))
    sc.pp.highly_variable_genes(sample, n_top_genes=n_top_genes)
    keep = sample.var["highly_variable"].to_numpy()
    print(
        f"genes: kept the {int(keep.sum())} most variable of {adata.n_vars} (scanpy, on "
        f"{len(cells)} cells; --n-top-genes 0 keeps all)"
    )
    return adata[:, keep].copy()


def _first_word_note(info: dict) -> str:
    """The read line's note on names matched by their first word only ("" if none)."""
    names = list(info.get("matched_by_first_word", []))
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f", {len(names)} matched by their first word only ({shown})"


def _train(args: argparse.Namespace) -> int:
    import scvi

    import gim_scvi

    scvi.settings.seed = args.seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adata = gim_scvi.data.read_sciplex3(args.data)
    info = adata.uns["sciplex3"]
    print(
        f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes, schema {info['schema']}, "
        f"counts in {info['counts']}, {len(info['unmatched'])} unmatched compound name(s)"
        f"{_first_word_note(info)}; read in {time.perf_counter() - t0:.1f} s"
    )
    counts = str(info["counts"])
    layer = counts.split("/", 1)[1] if counts.startswith("layers/") else None
    likelihood = "normal" if counts == "None" else "nb"
    adata = _without_compounds_lacking_smiles(adata)
    adata = _highly_variable_genes(adata, layer, likelihood, args.n_top_genes, args.seed)
    t0 = time.perf_counter()
    gim_scvi.pp.featurize_smiles(
        adata, "smiles", method=args.features, n_bits=args.n_bits, control_key="control"
    )
    if "split_ood" not in adata.obs or args.resplit:
        gim_scvi.data.sciplex3_ood_split(adata, n_validation_drugs=args.n_validation_drugs)
    print(
        f"features: {adata.obsm['drug_features'].shape[1]} ({args.features}) in "
        f"{time.perf_counter() - t0:.1f} s; split: "
        + ", ".join(f"{k} {v}" for k, v in adata.obs["split_ood"].value_counts().items())
    )
    gim_scvi.GIM.setup_anndata(
        adata,
        features_key="drug_features",
        control_key="control",
        dose_key="dose_nM",
        perturbation_key="condition",
        cell_line_key="cell_line",
        layer=layer,
    )
    model = gim_scvi.GIM(
        adata,
        n_programs=args.n_programs,
        gene_likelihood=likelihood,
        binary_features=args.binary_features,
        feature_components=args.feature_components or None,
        ensemble_layers=tuple(args.ensemble_layers),
    )
    t0 = time.perf_counter()
    has_valid = bool((adata.obs["split_ood"] == "valid").any())
    model.train(
        max_epochs=args.epochs,
        split_key="split_ood",
        validation_split="valid" if has_valid else None,
        enable_progress_bar=not args.quiet,
    )
    print(f"training: {time.perf_counter() - t0:.1f} s")
    _print_ensemble_choice(model)
    _print_neighbour_choice(model)
    degs = gim_scvi.data.sciplex3_degs(adata) if args.degs == "file" else args.degs
    results = gim_scvi.tl.evaluate(model, adata, split_key="split_ood", heldout="ood", degs=degs)
    summary = gim_scvi.tl.summarize(results)
    print(f"\nheld-out (OOD) drugs (DEGs: {args.degs}):")
    _print_summary(summary)
    _print_comparison(results)
    if "ground_truth" in adata.uns:
        recovery = gim_scvi.tl.ground_truth_recovery(model, adata)
        print("recovery: " + ", ".join(f"{k} {v:.3f}" for k, v in recovery.items()))
    _write_tables(out, results, summary)
    model.save(str(out / "model"), overwrite=True)
    print(f"wrote {out}/heldout_metrics.csv, heldout_summary.csv, heldout_scores.png, model/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``gim-scvi`` command."""
    parser = argparse.ArgumentParser(
        prog="gim-scvi",
        description="Generative Intervention Models: predict and explain unseen perturbations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate a screen, train, predict held-out drugs, report")
    demo.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    demo.add_argument("--n-programs", type=int, default=16, help="latent programs (default 16)")
    demo.add_argument("--n-genes", type=int, default=1000, help="simulated genes (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--out", default="gim_demo_output", help="output folder")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument(
        "--n-combinations",
        type=int,
        default=8,
        help="pairs of training drugs to predict together (default 8; 0: none)",
    )
    demo.add_argument("--small", action="store_true", help="a tiny data set (for smoke tests)")
    demo.set_defaults(func=_demo)
    tr = sub.add_parser(
        "train", help="read a sci-Plex 3 file, featurise, train, score the OOD drugs"
    )
    tr.add_argument("--data", required=True, help="h5ad (chemCPA, pertpy or canonical schema)")
    tr.add_argument("--epochs", type=int, default=None, help="default: scaled to the data")
    tr.add_argument("--n-programs", type=int, default=16)
    tr.add_argument(
        "--features",
        choices=["morgan", "descriptors", "both"],
        default="both",
        help="RDKit features of the compounds: Morgan bits, standardised 2D descriptors, or "
        "both (default; ahead of Morgan bits alone on the synthetic sci-Plex, "
        "benchmarks/README.md)",
    )
    tr.add_argument("--n-bits", type=int, default=1024, help="Morgan fingerprint length")
    tr.add_argument(
        "--binary-features",
        choices=["standardize", "center"],
        default="standardize",
        help="fingerprint bits standardised like other features, or only centred",
    )
    tr.add_argument(
        "--feature-components",
        type=int,
        default=16,
        help="the generators read this many principal components of the standardised "
        "features of the training drugs (default 16; 0: every feature column)",
    )
    tr.add_argument(
        "--ensemble-layers",
        type=int,
        nargs="+",
        default=[0, 1],
        help="hidden layers of the generator-ensemble members, one number per kind of "
        "member (default 0 1: linear maps and one-layer MLPs, chosen on the validation drugs)",
    )
    tr.add_argument("--n-validation-drugs", type=int, default=10)
    tr.add_argument(
        "--n-top-genes",
        type=int,
        default=2000,
        help="train on this many highly variable genes when the file has more (scanpy, on "
        "up to 50,000 cells); 0 keeps every gene (default 2000, as chemCPA's files)",
    )
    tr.add_argument("--resplit", action="store_true", help="recompute an existing split_ood")
    tr.add_argument(
        "--degs",
        choices=["pooled_doses", "condition", "file"],
        default="pooled_doses",
        help="DEGs per drug x cell line over all doses (chemCPA's definition, on which "
        "published sci-Plex DEG-R2 values rest; default), per condition, or the chemCPA "
        "file's own uns['all_DEGs']",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", default="gim_train_output", help="output folder")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)
    ev = sub.add_parser("evaluate", help="score a saved model on held-out conditions of a file")
    ev.add_argument("--model", required=True, help="folder written by GIM.save")
    ev.add_argument("--data", required=True, help="h5ad file set up like the training data")
    ev.add_argument("--split-key", default="split", help="obs column with the split")
    ev.add_argument("--heldout", default="test", help="split value to score (default test)")
    ev.add_argument("--train", default="train", help="split value of training cells")
    ev.add_argument(
        "--degs",
        choices=["condition", "pooled_doses"],
        default="condition",
        help="DEGs per condition (default) or per perturbation x cell line over all doses",
    )
    ev.add_argument("--out", default="gim_evaluate_output", help="output folder")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gim-scvi``."""
    args = build_parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)
    # Lightning's own use of deprecated torch APIs: nothing a user of the CLI can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module="lightning")
    np.seterr(all="ignore")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
