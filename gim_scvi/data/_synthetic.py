"""Synthetic perturbation screens with a known latent causal model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def random_dag(n_nodes: int, edge_prob: float, rng: np.random.Generator) -> np.ndarray:
    """Weighted adjacency of a random DAG (``W[i, j]``: edge ``i -> j``), weights ±[0.5, 1]."""
    order = rng.permutation(n_nodes)
    rank = np.empty(n_nodes, dtype=int)
    rank[order] = np.arange(n_nodes)
    allowed = rank[:, None] < rank[None, :]
    present = allowed & (rng.random((n_nodes, n_nodes)) < edge_prob)
    weights = rng.uniform(0.5, 1.0, (n_nodes, n_nodes)) * rng.choice([-1.0, 1.0], (n_nodes,) * 2)
    return np.where(present, weights, 0.0)


def _drug_mechanisms(
    n_drugs: int,
    n_programs: int,
    n_mechanism: int,
    inert_fraction: float,
    rng: np.random.Generator,
    mechanism: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Targets, shifts and dose response as smooth functions of a hidden mechanism vector.

    The mechanism vectors are drawn from a standard normal unless given.
    """
    mech = rng.normal(size=(n_drugs, n_mechanism)) if mechanism is None else mechanism
    target_map = rng.normal(size=(n_mechanism, n_programs))
    sign_map = rng.normal(size=(n_mechanism, n_programs))
    scores = mech @ target_map / np.sqrt(n_mechanism)
    n_targets = np.clip((scores > 1.0).sum(1), 1, 3)
    order = np.argsort(-scores, axis=1)
    targets = np.zeros((n_drugs, n_programs), dtype=bool)
    for d in range(n_drugs):
        targets[d, order[d, : n_targets[d]]] = True
    potency_dir = rng.normal(size=n_mechanism)
    potency = mech @ potency_dir / np.sqrt(n_mechanism)
    magnitude = 1.5 + 1.0 * np.tanh(potency)
    inert = (
        potency <= np.quantile(potency, inert_fraction)
        if inert_fraction > 0
        else potency < -np.inf
    )
    magnitude[inert] = 0.1
    signs = np.sign(mech @ sign_map + 1e-9)
    shifts = np.where(targets, signs * magnitude[:, None], 0.0)
    ec50_dir = rng.normal(size=n_mechanism)
    log10_ec50 = 2.5 + 0.6 * np.tanh(mech @ ec50_dir / np.sqrt(n_mechanism)) * 1.5
    hill = 1.0 + 0.5 * (np.tanh(mech[:, 0]) + 1.0)
    return {
        "mechanism": mech,
        "targets": targets,
        "shifts": shifts,
        "log10_ec50": log10_ec50,
        "hill": hill,
        "inert": inert,
    }


def _drug_shift(mech: dict, drug: np.ndarray, dose: np.ndarray) -> np.ndarray:
    """Shift ``a`` of each row's drug at its dose (Hill dose response)."""
    hill = mech["hill"][drug]
    ec50 = 10.0 ** mech["log10_ec50"][drug]
    response = dose**hill / (dose**hill + ec50**hill)
    return mech["shifts"][drug] * response[:, None]


def _training_pairs(split_of_drug: np.ndarray, n_pairs: int, rng: np.random.Generator):
    """``n_pairs`` distinct unordered pairs of training drugs (indices, smaller first)."""
    train = np.flatnonzero(split_of_drug == "train")
    a, b = np.triu_indices(len(train), k=1)
    if n_pairs > len(a):
        raise ValueError(
            f"n_combinations={n_pairs} exceeds the {len(a)} pairs of the {len(train)} "
            "training drugs."
        )
    pick = np.sort(rng.choice(len(a), size=n_pairs, replace=False))
    return np.stack([train[a[pick]], train[b[pick]]], axis=1)


def _sample_counts(
    mean_fn, n_cells: int, theta: np.ndarray, rng: np.random.Generator, chunk: int
) -> sp.csr_matrix:
    """Gamma-Poisson (NB) counts, generated chunk by chunk into a CSR matrix."""
    blocks = []
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        mu = mean_fn(start, stop)
        rate = rng.gamma(shape=theta, scale=mu / theta)
        counts = rng.poisson(rate).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    return sp.vstack(blocks, format="csr")


def synthetic(
    n_drugs: int = 48,
    n_heldout_drugs: int = 8,
    n_validation_drugs: int = 4,
    n_cell_lines: int = 3,
    doses: Sequence[float] = (10.0, 100.0, 1000.0, 10000.0),
    cells_per_condition: int = 30,
    control_cells_per_line: int = 900,
    n_genes: int = 1000,
    n_programs: int = 8,
    n_features: int = 64,
    n_mechanism: int = 6,
    edge_prob: float = 0.3,
    exogenous_sd: float = 0.5,
    inert_fraction: float = 0.15,
    library_median: float = 3000.0,
    feature_noise: float = 0.3,
    n_combinations: int = 0,
    seed: int = 0,
    chunk_size: int = 20000,
) -> AnnData:
    """Simulate a drug screen from a latent causal model with known interventions.

    Cells of line ``c`` have programs ``z = (u + a) (I - W)^{-1}`` with exogenous state
    ``u ~ N(mu_c, exogenous_sd^2 I)``, a random DAG ``W`` and the drug's intervention
    ``a_k = t_k m_k hill(dose)``; counts are negative binomial with mean
    ``library * softmax(z D^T + b_c)`` for sparse non-negative loadings ``D``. Each drug's
    targets (1-3 programs), shift sizes, EC50 and Hill slope are smooth functions of a hidden
    mechanism vector, and its observed features are a noisy linear image of that vector, so
    drugs with similar features act alike; some drugs are nearly inert.

    Parameters
    ----------
    n_drugs
        Number of drugs.
    n_heldout_drugs
        Drugs held out entirely (``split == "test"``, all doses and lines).
    n_validation_drugs
        Drugs for model selection (``split == "valid"``).
    n_cell_lines
        Number of cell lines.
    doses
        Doses (nM) at which every drug is applied.
    cells_per_condition
        Cells per drug x dose x cell line.
    control_cells_per_line
        Vehicle cells per cell line.
    n_genes
        Number of genes.
    n_programs
        Number of true programs.
    n_features
        Width of the drug feature vectors.
    n_mechanism
        Dimension of the hidden mechanism behind features and effects.
    edge_prob
        Edge probability of the random DAG.
    exogenous_sd
        Standard deviation of the exogenous program noise.
    inert_fraction
        Fraction of nearly inert drugs.
    library_median
        Median library size (UMI per cell); library sizes are log-normal.
    feature_noise
        Noise added to the features (relative to their signal).
    n_combinations
        Pairs of training drugs also applied together, at every dose (both drugs at that
        dose) and line, with ``split == "combo"`` and condition ``"drug_a+drug_b"``; their
        shifts add up in the latent model. Their ``drug_features`` row is the sum of the two
        drugs' features (so it is not a control row); score them with
        :func:`gim_scvi.tl.evaluate`, which composes the components' interventions. The
        single-drug cells are the same as without combinations.
    seed
        Random seed.
    chunk_size
        Cells generated at a time (memory stays bounded for large data sets).

    Returns
    -------
    AnnData
        Integer counts (CSR) in ``.X``; ``.obs`` columns ``condition``, ``cell_line``,
        ``dose``, ``control``, ``split``; ``.obsm["drug_features"]`` (zeros for controls);
        ``.uns["ground_truth"]`` with ``targets``, ``shifts``, ``drugs`` (EC50, Hill slope,
        inert flag and split per drug), ``dag``, ``loadings``, ``basal_means``, ``genes``
        (log base rate and NB dispersion per gene), ``line_bias`` (lines x genes),
        ``mechanism`` (each drug's hidden mechanism vector), ``params``, ``drug_features`` and,
        with combinations, ``combinations`` (their components). A cell's expected counts are
        its library size times ``softmax((u + a) (I - W)^-1 L^T + base + line_bias)``, ``u``
        its exogenous programs and ``a`` its drug's shift.
    """
    if n_heldout_drugs + n_validation_drugs >= n_drugs:
        raise ValueError("n_heldout_drugs + n_validation_drugs must be smaller than n_drugs.")
    rng = np.random.default_rng(seed)
    drugs = [f"drug_{i:03d}" for i in range(n_drugs)]
    lines = [f"line_{chr(ord('A') + i)}" for i in range(n_cell_lines)]

    def make_drugs(rng: np.random.Generator):
        mech = _drug_mechanisms(n_drugs, n_programs, n_mechanism, inert_fraction, rng)
        feature_map = rng.normal(size=(n_mechanism, n_features)) / np.sqrt(n_mechanism)
        drug_features = mech["mechanism"] @ feature_map
        drug_features += feature_noise * rng.normal(size=drug_features.shape)
        perm = rng.permutation(n_drugs)
        split_of_drug = np.array(["train"] * n_drugs, dtype=object)
        split_of_drug[perm[:n_heldout_drugs]] = "test"
        split_of_drug[perm[n_heldout_drugs : n_heldout_drugs + n_validation_drugs]] = "valid"
        return mech, split_of_drug, drug_features.astype(np.float32)

    adata, drug_features = simulate_screen(
        drugs,
        lines,
        make_drugs,
        rng,
        doses=doses,
        cells_per_condition=cells_per_condition,
        control_cells_per_line=control_cells_per_line,
        n_genes=n_genes,
        n_programs=n_programs,
        edge_prob=edge_prob,
        exogenous_sd=exogenous_sd,
        library_median=library_median,
        chunk_size=chunk_size,
        n_combinations=n_combinations,
    )
    # "control" is category 0, the drugs follow, then any combinations (sum of components)
    categories = adata.obs["condition"].cat.categories[1:]
    table = np.zeros((len(categories) + 1, n_features), dtype=np.float32)
    table[1 : n_drugs + 1] = drug_features
    pairs = adata.uns["ground_truth"].get("combinations")
    if pairs is not None:
        position = {d: i for i, d in enumerate(drugs)}
        for i, parts in enumerate(pairs.to_numpy()):
            table[n_drugs + 1 + i] = sum(drug_features[position[d]] for d in parts)
    adata.obsm["drug_features"] = table[adata.obs["condition"].cat.codes.to_numpy()]
    adata.uns["ground_truth"]["drug_features"] = pd.DataFrame(
        drug_features, index=drugs, columns=[f"feature_{j}" for j in range(n_features)]
    )
    adata.uns["ground_truth"]["params"]["seed"] = seed
    return adata


def simulate_screen(
    drugs: list[str],
    lines: list[str],
    make_drugs,
    rng: np.random.Generator,
    doses: Sequence[float],
    cells_per_condition: int,
    control_cells_per_line: int,
    n_genes: int,
    n_programs: int,
    edge_prob: float,
    exogenous_sd: float,
    library_median: float,
    chunk_size: int,
    n_combinations: int = 0,
) -> tuple[AnnData, np.ndarray]:
    """Counts of every drug x dose x line (and controls) from a random latent causal model.

    ``make_drugs(rng)`` returns the drugs' mechanisms (see ``_drug_mechanisms``), their split
    labels and their feature table; it is called after the causal model is drawn. With
    ``n_combinations``, pairs of training drugs are also applied together (both at each dose;
    shifts add up), named ``"drug_a+drug_b"`` with split ``"combo"``, after the single drugs
    and from a random stream of their own. Returns the AnnData (obs ``condition``,
    ``cell_line``, ``dose``, ``control``, ``split``; ground truth in ``.uns``) and the feature
    table.
    """
    n_cell_lines = len(lines)
    dag = random_dag(n_programs, edge_prob, rng)
    solve = np.linalg.inv(np.eye(n_programs) - dag)
    loadings = np.where(
        rng.random((n_genes, n_programs)) < 1.5 / n_programs,
        rng.uniform(0.3, 1.0, (n_genes, n_programs)),
        0.0,
    )
    gene_base = np.log(rng.gamma(0.6, 1.0, n_genes) + 1e-3)
    line_bias = rng.normal(0, 0.2, (n_cell_lines, n_genes))
    basal_means = rng.normal(0, 0.5, (n_cell_lines, n_programs))
    theta = np.exp(rng.normal(np.log(5.0), 0.5, n_genes))
    mech, split_of_drug, drug_features = make_drugs(rng)
    n_drugs = len(drugs)

    # cell table: controls first, then drug x dose x line
    doses = np.asarray(doses, dtype=float)
    n_ctrl = control_cells_per_line * n_cell_lines
    grid_drug, grid_dose, grid_line = np.meshgrid(
        np.arange(n_drugs), doses, np.arange(n_cell_lines), indexing="ij"
    )
    drug_idx = np.concatenate(
        [np.full(n_ctrl, -1), np.repeat(grid_drug.ravel(), cells_per_condition)]
    )
    dose_val = np.concatenate(
        [np.zeros(n_ctrl), np.repeat(grid_dose.ravel(), cells_per_condition)]
    )
    line_idx = np.concatenate(
        [
            np.repeat(np.arange(n_cell_lines), control_cells_per_line),
            np.repeat(grid_line.ravel(), cells_per_condition),
        ]
    )
    n_cells = drug_idx.size
    treated = drug_idx >= 0

    shift = np.zeros((n_cells, n_programs))
    shift[treated] = _drug_shift(mech, drug_idx[treated], dose_val[treated])

    def simulate_counts(shift: np.ndarray, line_idx: np.ndarray, rng: np.random.Generator):
        n = len(line_idx)
        exogenous = basal_means[line_idx] + exogenous_sd * rng.normal(size=(n, n_programs))
        programs = (exogenous + shift) @ solve
        log_library = np.log(library_median) + 0.4 * rng.normal(size=n)

        def mean_fn(start: int, stop: int) -> np.ndarray:
            logits = (
                programs[start:stop] @ loadings.T + gene_base + line_bias[line_idx[start:stop]]
            )
            logits -= logits.max(axis=1, keepdims=True)
            scale = np.exp(logits)
            scale /= scale.sum(axis=1, keepdims=True)
            return np.exp(log_library[start:stop, None]) * scale

        return _sample_counts(mean_fn, n, theta, rng, chunk_size)

    counts = simulate_counts(shift, line_idx, rng)
    condition = np.where(
        treated, np.asarray(drugs, dtype=object)[np.maximum(drug_idx, 0)], "control"
    )
    split = np.where(treated, split_of_drug[np.maximum(drug_idx, 0)], "train")
    dose_val = dose_val.astype(np.float32)
    combination_names: list[str] = []
    if n_combinations > 0:  # own random stream: the single-drug cells stay as without them
        combo_rng = np.random.default_rng(rng.integers(2**63))
        pairs = _training_pairs(split_of_drug, n_combinations, combo_rng)
        combination_names = [f"{drugs[a]}+{drugs[b]}" for a, b in pairs]
        grid_combo, grid_dose, grid_line = np.meshgrid(
            np.arange(len(pairs)), doses, np.arange(n_cell_lines), indexing="ij"
        )
        combo_idx = np.repeat(grid_combo.ravel(), cells_per_condition)
        combo_dose = np.repeat(grid_dose.ravel(), cells_per_condition)
        combo_line = np.repeat(grid_line.ravel(), cells_per_condition)
        combo_shift = sum(
            _drug_shift(mech, pairs[combo_idx, j], combo_dose) for j in range(pairs.shape[1])
        )
        counts = sp.vstack([counts, simulate_counts(combo_shift, combo_line, combo_rng)]).tocsr()
        condition = np.concatenate([condition, np.asarray(combination_names)[combo_idx]])
        split = np.concatenate([split, np.full(len(combo_idx), "combo", dtype=object)])
        dose_val = np.concatenate([dose_val, combo_dose.astype(np.float32)])
        line_idx = np.concatenate([line_idx, combo_line])
        treated = np.concatenate([treated, np.ones(len(combo_idx), bool)])
        n_cells = len(condition)
    split_names = ["train", "valid", "test"] + (["combo"] if combination_names else [])
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(
                condition, categories=["control", *drugs, *combination_names]
            ),
            "cell_line": pd.Categorical(np.asarray(lines)[line_idx], categories=lines),
            "dose": dose_val,
            "control": ~treated,
            "split": pd.Categorical(split, categories=split_names),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    program_names = [f"true_program_{k}" for k in range(n_programs)]
    adata = AnnData(
        X=counts, obs=obs, var=pd.DataFrame(index=[f"gene_{g:04d}" for g in range(n_genes)])
    )
    adata.uns["ground_truth"] = {
        "targets": pd.DataFrame(mech["targets"], index=drugs, columns=program_names),
        "shifts": pd.DataFrame(mech["shifts"], index=drugs, columns=program_names),
        "drugs": pd.DataFrame(
            {
                "log10_ec50": mech["log10_ec50"],
                "hill": mech["hill"],
                "inert": mech["inert"],
                "split": split_of_drug.astype(str),
            },
            index=drugs,
        ),
        "dag": pd.DataFrame(dag, index=program_names, columns=program_names),
        "loadings": pd.DataFrame(loadings, index=adata.var_names, columns=program_names),
        "basal_means": pd.DataFrame(basal_means, index=lines, columns=program_names),
        "genes": pd.DataFrame({"base": gene_base, "dispersion": theta}, index=adata.var_names),
        "line_bias": pd.DataFrame(line_bias, index=lines, columns=adata.var_names),
        "mechanism": pd.DataFrame(
            mech["mechanism"],
            index=drugs,
            columns=[f"mechanism_{j}" for j in range(mech["mechanism"].shape[1])],
        ),
        "params": {
            "exogenous_sd": exogenous_sd,
            "doses": doses.tolist(),
            "library_median": library_median,
        },
    }
    if combination_names:
        adata.uns["ground_truth"]["combinations"] = pd.DataFrame(
            np.asarray(drugs, dtype=object)[pairs],
            index=combination_names,
            columns=[f"component_{j + 1}" for j in range(pairs.shape[1])],
        )
    return adata, drug_features
