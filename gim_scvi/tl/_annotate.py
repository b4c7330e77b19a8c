"""Write a trained model's results into an AnnData."""

from __future__ import annotations

import importlib.metadata as md
import inspect

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from gim_scvi._utils import context_labels
from gim_scvi.module._module import gather_rows


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("gim_scvi", "scvi-tools", "torch", "anndata", "scanpy", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_params(model) -> dict:
    """Every setting of a model (init, setup, training statistics) plus package versions."""
    init = model.init_params_
    flat = {**init.get("kwargs", {}), **init.get("non_kwargs", {})}
    flat = {k: v for k, v in flat.items() if isinstance(v, str | int | float | bool | type(None))}
    module_kwargs = init.get("kwargs", {}).get("module_kwargs", {}) or {}
    defaults = {
        name: par.default
        for name, par in inspect.signature(type(model.module).__init__).parameters.items()
        if par.default is not inspect.Parameter.empty
    }
    module_settings = {**defaults, **module_kwargs, **flat}
    return {
        "init": {k: ("None" if v is None else v) for k, v in flat.items()},
        "module": {
            k: v for k, v in module_settings.items() if isinstance(v, str | int | float | bool)
        },
        "train": {k: ("None" if v is None else v) for k, v in model.train_params_.items()},
        "setup": {
            k: ("None" if v is None else v) for k, v in model.registry_["setup_args"].items()
        },
        "graph_pruning": dict(model.graph_pruning_),
        "versions": _versions(),
    }


@torch.inference_mode()
def annotate(
    model,
    adata: AnnData | None = None,
    key_added: str = "gim",
    layers: bool = True,
    batch_size: int = 1024,
) -> None:
    """Write a trained GIM's results into ``adata`` (in place, under ``key_added`` only).

    Never touches ``.X`` or existing layers. Writes

    - ``.obsm[f"X_{key_added}"]``: latent program activities (posterior means);
    - ``.varm[f"{key_added}_programs"]``: gene loadings of each program;
    - ``.layers[f"{key_added}_predicted"]``: each cell's expected expression under its own
      condition, and ``.layers[f"{key_added}_basal"]``: the same cell's counterfactual
      without its perturbation (expected counts, dense float32; skip with ``layers=False``);
    - ``.uns[key_added]``: ``params``, ``conditions`` (perturbation, dose, cell line of each
      perturbed context, and ``targets_from_features``: the context's perturbation showed no
      effect in its cells, so its targets are read from its features, see
      :meth:`~gim_scvi.GIM.get_intervention_targets`), ``targets`` (probabilities),
      ``shifts`` and ``total_effects`` (expected shift ``a`` and its propagation
      ``a A^{-1}``; condition x program), ``graph`` (program x program) and
      ``predicted_shift`` (condition x gene log2 fold change of the predicted vs the basal
      normalised expression of the condition's cells).

    The per-cell counterfactuals use the expected intervention (``mode="mean"``), like the
    ``shifts`` written to ``.uns``.

    Parameters
    ----------
    model
        A trained :class:`~gim_scvi.GIM`.
    adata
        AnnData registered with the model (default: the training AnnData).
    key_added
        Prefix / key of everything written.
    layers
        Write the two dense per-cell layers.
    batch_size
        Cells processed at a time.
    """
    adata = adata if adata is not None else model.adata
    if not adata.var_names.equals(model._var_names()):
        raise ValueError(
            "annotate writes per-gene results, so the AnnData must have the model's genes in "
            "the model's order: use `adata[:, model.adata.var_names].copy()` (or "
            "`model.align_genes(adata)`)."
        )
    adata_checked = model._validate_anndata(adata)
    for existing in (f"{key_added}_predicted", f"{key_added}_basal"):
        if layers and existing in adata.layers and key_added not in adata.uns:
            raise ValueError(
                f"adata.layers[{existing!r}] exists and was not written by gim_scvi; choose "
                "another `key_added`."
            )
    latent, predicted, basal, contexts = _per_cell(model, adata_checked, batch_size, layers)
    interventions = model.get_interventions(adata_checked, mode="mean")
    adata.obsm[f"X_{key_added}"] = latent
    adata.varm[f"{key_added}_programs"] = model.get_gene_programs().to_numpy()
    if layers:
        adata.layers[f"{key_added}_predicted"] = predicted
        adata.layers[f"{key_added}_basal"] = basal
    adata.uns[key_added] = {
        "params": model_params(model),
        "conditions": interventions["conditions"],
        "targets": interventions["targets"],
        "shifts": interventions["shifts"],
        "total_effects": interventions["total_effects"],
        "graph": model.get_causal_graph(),
        "predicted_shift": _predicted_shift(model, contexts, interventions["conditions"].index),
        "program_names": np.asarray(model.program_names),
    }


def _per_cell(model, adata, batch_size, layers):
    """Latent means, expected expression under own condition and basal counterfactual."""
    module = model.module
    module.eval()
    scdl = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=False)
    latents, preds, basals = [], [], []
    scale_sum: dict[str, np.ndarray] = {}
    basal_sum: dict[str, np.ndarray] = {}
    names = model._perturbation_names(adata)
    doses = model._doses(adata)
    lines = np.asarray(model.cell_lines)[model._cell_line_codes(adata)]
    start = 0
    for tensors in scdl:
        inf = module.inference(**module._get_inference_input(tensors))
        gen_in = {  # the loader's tensors are on the CPU, the module may be on a GPU
            key: value.to(module.device) if isinstance(value, torch.Tensor) else value
            for key, value in module._get_generative_input(tensors, inf).items()
        }
        z = inf["qz"].loc
        shift, log_scale, _ = module._contextual_intervention(
            gen_in["features"], gen_in["dose"], gen_in["cell_line"], gen_in["treated"]
        )
        u = module.scm.abduct(z, shift)
        if log_scale is not None:
            mu = gather_rows(module.basal_mean.weight, gen_in["cell_line"].view(-1))
            u = mu + (u - mu) * torch.exp(-log_scale)
        z_basal = module.scm.solve(u)
        lib, line, batch = gen_in["library"], gen_in["cell_line"], gen_in["batch_index"]
        px = module.decoder(z, lib, line, batch)
        px_basal = module.decoder(z_basal, lib, line, batch)
        latents.append(z.cpu().numpy())
        if layers:
            preds.append(px.mean.cpu().numpy().astype(np.float32))
            basals.append(px_basal.mean.cpu().numpy().astype(np.float32))
        stop = start + z.shape[0]
        treated = gen_in["treated"].cpu().numpy()
        sl = np.arange(start, stop)[treated]
        keys = context_labels(names[sl], None if doses is None else doses[sl], lines[sl])
        p_mean = _profile(px, module).cpu().numpy()[treated]
        b_mean = _profile(px_basal, module).cpu().numpy()[treated]
        for key in np.unique(keys):
            rows = keys == key
            scale_sum[key] = scale_sum.get(key, 0) + p_mean[rows].sum(0)
            basal_sum[key] = basal_sum.get(key, 0) + b_mean[rows].sum(0)
        start = stop
    latent = np.concatenate(latents)
    predicted = np.concatenate(preds) if layers else None
    basal = np.concatenate(basals) if layers else None
    return latent, predicted, basal, (scale_sum, basal_sum)


def _profile(px, module):
    """Normalised expression (count likelihoods) or mean (normal) per cell."""
    if module.gene_likelihood == "normal":
        return px.mean
    return (
        px.scale
        if hasattr(px, "scale") and px.scale is not None
        else px.mean / px.mean.sum(-1, keepdim=True)
    )


def _predicted_shift(model, contexts, index: pd.Index) -> pd.DataFrame:
    scale_sum, basal_sum = contexts
    var_names = model._var_names()
    rows = {}
    for key in index:
        pred, base = scale_sum[key], basal_sum[key]
        if model.module.gene_likelihood == "normal":
            rows[key] = pred - base
        else:
            rows[key] = np.log2((pred + 1e-12) / (base + 1e-12))
    return pd.DataFrame.from_dict(rows, orient="index", columns=var_names)


__all__ = ["annotate", "model_params"]
