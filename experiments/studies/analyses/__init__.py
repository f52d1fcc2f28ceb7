"""What each study measures, in numbers only: each analysis takes {variant: Run} and returns its
results (a JSON-ready dict). NumPy only; the figures are in figures.py.

  balance.py   imbalance, shortcut, depth, loss-free, Top-1 LBL, domains, dense, no-newline
  sparsity.py  progressive sparsification, the phase transition, adaptive top-k
  noise.py     the seed-to-seed noise bar
  common.py    what they share
"""

from experiments.studies.analyses.balance import (dense, depth, depth_profile, domains, imbalance,
                                                  loss_free, loss_free_long, no_newline, shortcut,
                                                  top1_lbl)
from experiments.studies.analyses.common import (by_seed, seeded, domain_information,
                                                 interval, mean_active_params, with_early_drops,
                                                 with_intervals)
from experiments.studies.analyses.noise import (BRANCH_KINDS, FROM_SCRATCH_KINDS, paired_noise,
                                                seed_noise)
from experiments.studies.analyses.sparsity import (ADAPTIVE_GROUPS, ADAPTIVE_WINDOW_GROUPS,
                                                   SWITCH_STEPS, adaptive, adaptive_window,
                                                   progressive, rule_driven_changes, transition,
                                                   window_shares)
