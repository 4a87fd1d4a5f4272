"""Compute-optimal planning for patch-level pretraining.

Modules:
    chinchilla  -- Chinchilla's 20-tokens-per-parameter rule and parametric loss fits
    hardware    -- GPU peaks, measured/assumed MFU, GPU-hours to FLOPs
    shapes      -- table of sensible model shapes, with parallelism and LR
    plan        -- sizing (N, D, compute) and the patch-level / EST savings
    commands    -- pretrain_patch_gpt.py command lines for both stages
    report      -- readable table and JSON
"""
