"""Our block-diffusion parts against NeMo-AutoModel 0.7.0's text dLLM parts (docs/design.md, "NeMo-AutoModel's
dLLM parts and ours").

NeMo's ``MDLMCrossEntropyLoss`` computes the same weighted cross-entropy as our ``diffusion_ce_loss`` once its
inputs are put in our terms: our loss positions are its ``noise_mask & loss_mask``, our per-position weight ``w``
(the block's ``1/t``, capped, halved at block padding) is its ``1 / p_mask``, and our final divisor is its
``num_diffusion_tokens``. Our per-sample normaliser (``sample_mean``) folds into ``p_mask`` as well. These tests
feed both the loss positions of a real collated batch and check that loss and gradient agree, so the mapping in
the design page is a checked statement. The parts that compute something else (corruption, the I-DLM mask, the
flat block-diffusion loss) are not exercised here; the table says why they differ.
"""

from __future__ import annotations

import pytest
import torch

from nemo_automodel.components.loss.dllm_loss import MDLMCrossEntropyLoss

from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion import diffusion_ce_loss, reduce_token_losses


@pytest.fixture(scope="module")
def batch(tiny_processor):
    """A collated PBM batch (block size 4, ELBO weight capped at 10) of four shapes records."""
    collator = BardVLCollator(processor=tiny_processor, block_size=4, max_loss_weight=10.0)
    ds = shapes_dataset("train", size=4, seed=0)
    return collator([ds[i] for i in range(4)])


def _logits(batch, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = int(torch.as_tensor(batch["loss_targets"]).numel())
    return (torch.randn(m, vocab, generator=g) * 3).requires_grad_(True)


def _nemo(logits, batch, p_mask, denominator):
    """NeMo's MDLM loss on our loss positions laid out as one ``[1, M]`` row, all of them corrupted."""
    targets = torch.as_tensor(batch["loss_targets"]).long()
    m = targets.numel()
    ones = torch.ones(1, m, dtype=torch.bool)
    out = MDLMCrossEntropyLoss()(
        logits[None], targets[None], noise_mask=ones, p_mask=p_mask[None], loss_mask=ones,
        num_diffusion_tokens=denominator,
    )
    return out.total_loss


@pytest.mark.parametrize("denominator", [None, 7])
def test_mdlm_loss_equals_our_token_reduction(batch, tiny_processor, denominator):
    """``1/p_mask`` = our weight, ``num_diffusion_tokens`` = our divisor: same value and same gradient."""
    vocab = len(tiny_processor.tokenizer)
    weights = torch.as_tensor(batch["loss_weights"]).float()
    targets = torch.as_tensor(batch["loss_targets"]).long()
    assert weights.min() < weights.max()  # several levels, capped weights and halved padding all present

    ours_logits, nemo_logits = _logits(batch, vocab), _logits(batch, vocab)
    if denominator is None:  # NeMo without a count returns the weighted sum
        ours = diffusion_ce_loss(ours_logits, targets, weights, None, None, reduction="sum")
    else:
        ours = diffusion_ce_loss(ours_logits, targets, weights, None, None, reduction="token_mean",
                                 denominator=denominator)
    nemo = _nemo(nemo_logits, batch, 1.0 / weights, denominator)
    torch.testing.assert_close(nemo, ours, rtol=1e-6, atol=1e-6)
    ours.backward()
    nemo.backward()
    torch.testing.assert_close(nemo_logits.grad, ours_logits.grad, rtol=1e-6, atol=1e-7)


def test_mdlm_loss_reproduces_our_sample_mean(batch, tiny_processor):
    """Our default reduction (per sample ``sum(w CE) / noisy-region length``, then the mean over samples) is NeMo's
    loss with the per-sample normaliser folded into ``p_mask`` and the sample count as ``num_diffusion_tokens``."""
    vocab = len(tiny_processor.tokenizer)
    weights = torch.as_tensor(batch["loss_weights"]).float()
    targets = torch.as_tensor(batch["loss_targets"]).long()
    index = torch.as_tensor(batch["loss_sample_index"]).long()
    normalizer = torch.as_tensor(batch["loss_normalizer"]).float()
    samples = int(torch.unique(index).numel())
    assert samples == 4

    ours_logits, nemo_logits = _logits(batch, vocab, 1), _logits(batch, vocab, 1)
    per_token = diffusion_ce_loss(ours_logits, targets, weights, None, None, reduction="none")
    ours = reduce_token_losses(per_token, "sample_mean", index, normalizer)
    nemo = _nemo(nemo_logits, batch, normalizer[index] / weights, samples)
    torch.testing.assert_close(nemo, ours, rtol=1e-6, atol=1e-6)
    ours.backward()
    nemo.backward()
    torch.testing.assert_close(nemo_logits.grad, ours_logits.grad, rtol=1e-6, atol=1e-7)


def test_mdlm_loss_takes_the_logits_dtype_where_ours_upcasts(batch, tiny_processor):
    """The one numerical difference: NeMo 0.7.0 stores ``fp32_upcast`` but computes the cross-entropy in the
    logits' dtype; ours always computes it in fp32. On bf16 logits (GPU training) ours equals the fp32
    computation, NeMo's does not."""
    vocab = len(tiny_processor.tokenizer)
    weights = torch.as_tensor(batch["loss_weights"]).float()
    targets = torch.as_tensor(batch["loss_targets"]).long()
    logits = _logits(batch, vocab, 2).detach()
    bf16 = logits.to(torch.bfloat16)
    fp32_of_bf16 = diffusion_ce_loss(bf16.float(), targets, weights, None, None, reduction="sum")
    ours = diffusion_ce_loss(bf16, targets, weights, None, None, reduction="sum")
    assert ours.dtype == torch.float32 and torch.equal(ours, fp32_of_bf16)
    nemo = _nemo(bf16, batch, 1.0 / weights, None)
    assert nemo.dtype == torch.float32  # bf16 CE times the fp32 weights
    assert not torch.equal(nemo, ours)
