"""Tables and figures from runs: spectral specialisation, spectrum changes, training curves."""
