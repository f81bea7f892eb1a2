"""Relaxation data: trajectory records, readers, curation, reference-potential generators, batching.

Submodules are imported lazily-cheap (no JAX work at import). Main entry points::

    from bptt_mlip import data
    trajs = data.read_trajectories("run.vasprun.xml.gz")      # or .extxyz(.gz), OUTCAR, MPtrj .json
    trajs, report = data.curate(trajs)
    test, train = data.split_test_train(trajs, num_test=20)
    for batch in data.relaxation_batches(train, 8, shuffle_key_or_seed=0): ...
    default = data.load_default_dataset("si_defects")
"""

from bptt_mlip.data.batching import (
    DEFAULT_BUCKETS,
    bucket_atoms,
    force_batches,
    intermediate_relaxation_batches,
    intermediate_start_pairs,
    make_relaxation_batch,
    relaxation_batches,
)
from bptt_mlip.data.curation import CurationReport, curate, kfold_splits, split_test_train
from bptt_mlip.data.integrity import IncompleteRunWarning
from bptt_mlip.data.generator import generate_and_save, generate_crystals, generate_si_defects
from bptt_mlip.data.store import load_dataset, load_default_dataset, save_dataset
from bptt_mlip.data.readers import (
    from_ase_frames,
    from_pymatgen_structures,
    guess_format,
    read_extxyz,
    read_mptrj_json,
    read_outcar,
    read_trajectories,
    read_vasprun,
)
from bptt_mlip.data.trajectory import (
    Trajectory,
    TrajectoryError,
    make_trajectory,
    mass_weighted_distance,
    unwrap,
    validate,
)
