"""The paper's recipe as one job: plan both stages, see how far a run got, launch what remains."""
