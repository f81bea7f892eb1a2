"""Using a trained model: load it, relax ASE / pymatgen structures, the ASE calculator, the
command line and plots."""
