"""The reverse process made visible (Wang & Vastola 2023, "Diffusion models generate images like painters").

    trajectory.py    record_trajectory: x_t and the x0 prediction at every step of any sampler
    geometry.py      trajectory_geometry: share of variance in the top-2 principal components, angle swept
    bands.py         band_energy, settle_step: low / high spatial-frequency energy of the x0 prediction
    perturbation.py  perturbation_sensitivity: change of the final image vs the step of a fixed-norm nudge
    gaussian.py      GaussianFit, fit_gaussian: the data's Gaussian, its ideal denoiser and the closed-form
                     probability-flow solution (analytical teleportation, ldm/samplers/teleport.py)

``ldm analyze`` (inference/analyze_cli.py) runs all four on a model; docs/analysis.md has the formulas and results.
"""
from .bands import band_energy, band_masks, settle_step
from .gaussian import GaussianFit, fit_gaussian, load_gaussian, save_gaussian
from .geometry import trajectory_geometry
from .perturbation import perturbation_sensitivity, unit_directions
from .trajectory import Trajectory, record_trajectory

__all__ = [
    "GaussianFit", "Trajectory", "band_energy", "band_masks", "fit_gaussian", "load_gaussian",
    "perturbation_sensitivity", "record_trajectory", "save_gaussian", "settle_step", "trajectory_geometry",
    "unit_directions",
]
