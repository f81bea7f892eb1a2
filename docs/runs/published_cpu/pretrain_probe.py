"""Probe: does the published-size ADAPT (8 layers, d_model 256) learn forces at all in a few
epochs, and at which learning rate / dropout? Force pretraining on 40 training trajectories of
the shipped Si-defect set (every stored frame), validation on 10 others; prints the validation
force RMSE per epoch next to the zero-force RMSE. Run from the repository root:

    python docs/runs/published_cpu/pretrain_probe.py               # 5 settings, 40 trajectories, 3 epochs
    python docs/runs/published_cpu/pretrain_probe.py 1 full 150    # setting 1 on all 220, 2 epochs, warmup 150
"""

import dataclasses
import json
import sys
import time

import jax

from bptt_mlip.training import loops
from bptt_mlip.models import adapt as model
from bptt_mlip.training import optim
from bptt_mlip.training import steps as train
from bptt_mlip.data import load_default_dataset

trajs = load_default_dataset("si_defects")
val, tr = trajs[40:50], trajs[60:100]
norm = loops.normalizer_from_trajectories(tr)
settings = [
    ("published", 1e-4, 0.05), ("published", 1e-4, 0.0), ("published", 3e-4, 0.0), ("published", 1e-5, 0.0),
    ("small", 5e-4, 0.0),
]
# "full": every training trajectory of the main job's split (220), 2 epochs, with warmup
if len(sys.argv) > 2 and sys.argv[2] == "full":
    val, tr = trajs[40:60], trajs[60:]
    norm = loops.normalizer_from_trajectories(tr)
WARMUP = int(sys.argv[3]) if len(sys.argv) > 3 else 0
EPOCHS = 2 if len(sys.argv) > 2 and sys.argv[2] == "full" else 3
if len(sys.argv) > 1:
    settings = [settings[int(i)] for i in sys.argv[1].split(",")]
for size, lr, dropout in settings:
    base = model.PUBLISHED if size == "published" else model.AdaptConfig(d_model=64, d_ff=128, num_heads=4, num_layers=2,
                                                                        embed_hidden=128)
    cfg = dataclasses.replace(base, input_encoding="xyz+fourier", dropout=dropout)
    t0 = time.time()
    _, hist = loops.pretrain(model.make_train_force_fn(cfg, norm), model.make_force_fn(cfg, norm),
                             model.init_params(cfg, jax.random.PRNGKey(0)), tr, val, epochs=EPOCHS, batch_size=32,
                             optim_config=optim.OptimConfig(learning_rate=lr, clip_norm=1.0, freeze_step=True,
                                                            warmup_steps=WARMUP))
    print(json.dumps({"size": size, "lr": lr, "dropout": dropout, "warmup": WARMUP, "train": len(tr), "epochs": EPOCHS, "s": round(time.time() - t0, 1),
                      "val_force_rmse": [round(h["val_force_rmse"], 4) for h in hist],
                      "zero": round(hist[-1]["val_zero_force_rmse"], 4),
                      "train_grad_norm": [round(h["train_grad_norm"], 4) for h in hist]}), flush=True)
