"""Surface proteins (ADT) from RNA on held-out cells (BMMC CITE-seq: donor s1d1 -> s1d2), scored as in the NeurIPS
2021 multimodal competition on per-protein CLR levels (the reference fitted on the training cells): RMSE, mean
Pearson per cell (across proteins) and per protein (across cells).

Arms: the training mean per protein; kNN, ridge and RBF kernel ridge regression on truncated-SVD features of the
log-normalised HVGs (the 2021 winner's approach; hyperparameters by 3-fold CV on the training cells); express's
protein regression head on the MLP encoder and on the transformer (pretrained, random weights) and its multimodal
VAE with a negative-binomial protein decoder (MLP encoder); totalVI (trained with the held-out cells' RNA and
their proteins missing, its documented imputation).
"""

from __future__ import annotations

from .common import Timer, express_arms, mlp_arm, train_test, vae_budget
from .suite import Bench, note, register


def protein_datasets(bench: Bench) -> list[str]:
    return [n for n, d in bench.datasets.items() if d.protein_key is not None and d.test_key is not None]


@register("proteins", protein_datasets, primary="pearson_per_protein",
          description="surface proteins (ADT) of held-out cells from their RNA: RMSE and mean Pearson per cell and "
                      "per protein on CLR levels")
def proteins(bench: Bench, name: str, seed: int) -> dict:
    from finetune import api
    from finetune import baselines as B
    from finetune import metrics as M
    from finetune.data import fit_protein_reference, normalize_proteins, protein_counts

    from . import scvi_arms

    data = bench.datasets[name]
    train, test = train_test(bench, name, seed, labelled=False)
    raw_train, names = protein_counts(train, data.protein_key)
    raw_test, _ = protein_counts(test, data.protein_key, names)
    reference = fit_protein_reference(raw_train, "clr")
    y_train = normalize_proteins(raw_train, "clr", reference)
    truth = normalize_proteins(raw_test, "clr", reference)
    arms = {"mean_protein": M.protein_metrics(B.mean_protein(y_train, test.n_obs), truth)}
    with Timer() as t:
        x_train, x_test, _ = B.log_normalized_features(train, test)
        f_train, f_test = B.svd_features(x_train, x_test, seed=seed)
    for arm, fit in (("knn_svd", B.knn_regression), ("ridge_svd", B.ridge_regression),
                     ("kernel_ridge_svd", B.kernel_ridge_svd)):
        with Timer() as t2:
            predicted = fit(f_train, y_train, f_test, seed=seed)
        arms[arm] = {**M.protein_metrics(predicted, truth), "seconds": t.seconds + t2.seconds}

    def express(arm: str, **kwargs) -> None:
        with Timer() as timer:
            model = api.fit_proteins(train, protein_obsm_key=data.protein_key, **kwargs)
            predicted = api.predict_proteins(test.copy(), model, gene_id_key=kwargs.get("gene_id_key"))
        # every express arm predicts on the scale of its own reference, fitted on the same training cells
        arms[arm] = {**M.protein_metrics(predicted[names].to_numpy(), truth), "seconds": timer.seconds}

    express("express_mlp_encoder", **mlp_arm(bench, seed))
    express("express_nb_vae_mlp_encoder", encoder="mlp", protein_head="nb", **vae_budget(bench, seed))
    for arm, kwargs in express_arms(bench, seed, bench.budget.protein_transformer_steps).items():
        express(arm, **kwargs)
    if scvi_arms.missing() is None and data.batch_key is not None:
        with Timer() as timer:
            predicted, order = scvi_arms.totalvi_proteins(train, test, protein_key=data.protein_key,
                                                          batch_key=data.batch_key,
                                                          epochs=bench.budget.totalvi_epochs, seed=seed)
            levels = normalize_proteins(predicted, "clr", reference) if order == names else None
        if levels is None:
            raise ValueError("totalVI returned the proteins in another order")
        arms["totalvi"] = {**M.protein_metrics(levels, truth), "seconds": timer.seconds}
    elif scvi_arms.missing() is not None:
        note(f"totalVI skipped: {scvi_arms.missing()}")
    note(f"proteins/{name}: {train.n_obs} training cells, {test.n_obs} held-out cells, {len(names)} proteins")
    return {"proteins": arms}
