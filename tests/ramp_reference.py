"""--rampup-batch-size from its definition, to test the code that follows megatron-core.

Megatron-LM's definition: the global batch starts at START and grows by INCREMENT
over n = (GLOBAL - START) / INCREMENT equal shares of the first RAMPUP_SAMPLES
consumed samples, so after c consumed samples it is START + INCREMENT * floor(c / (R / n))
for c <= R and GLOBAL after; a run of --train-samples S takes steps while the consumed
samples are within both R and S, then as many whole GLOBAL batches as S has left.
Exact rational arithmetic here, no megatron-core and no patch_megatron code.
"""

from fractions import Fraction


def batch_after(consumed, start, increment, rampup_samples, final):
    if consumed > rampup_samples:
        return final
    shares = (final - start) // increment
    return start + increment * int(Fraction(consumed) / Fraction(rampup_samples, shares))


def step_batches(start, increment, rampup_samples, final, train_samples):
    """The global batch of every step of the run, in order."""
    batches, consumed = [], 0
    while consumed <= rampup_samples and consumed <= train_samples:
        batches.append(batch_after(consumed, start, increment, rampup_samples, final))
        consumed += batches[-1]
    batches += [final] * (max(train_samples - consumed, 0) // final)
    return batches
