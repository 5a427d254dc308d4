"""express fine-tuning: cell types, VAE/IWAE latent spaces and surface-protein (ADT) prediction.

Entry points: ``python finetune/run.py`` (or ``express-finetune``) and the scverse-style functions in
:mod:`finetune.api`. Submodules are imported on use, so ``import finetune`` stays light.
"""
