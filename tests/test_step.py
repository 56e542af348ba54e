"""The trainer's micro-batch (``training.train.Step``) in process: gradient checkpointing and bf16 frozen weights."""

import torch

from training.adapter import adapter_modules, install_adapters, trainable_parameters
from training.train import TINY, Step, TrainConfig, load_models


def trainer(dtype=torch.float32):
    cfg = TrainConfig(**TINY)
    unet, vae, text_encoder, tokenizer, scheduler = load_models(cfg, torch.device("cpu"))
    for m in (unet, vae, text_encoder):
        m.to(dtype)
    install_adapters(unet, cfg.layers)
    params = trainable_parameters(unet)
    torch.manual_seed(0)
    for p in params:  # fp32 adapters, "trained" (W_proj no longer [I, 0]), as in the trainer
        p.data = p.data.float().normal_(0, 0.02)
    return Step(cfg, unet, vae, text_encoder, tokenizer, scheduler, torch.device("cpu")), unet, params


def batch(n: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"key": [f"s0-{i:08d}" for i in range(n)], "caption": ["a red cup on a table"] * n,
            "target": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "reference": torch.rand(n, 3, size, size, generator=g) * 2 - 1}


def test_gradient_checkpointing_gives_the_same_loss_and_adapter_gradients():
    step, unet, params = trainer()
    calls = []
    for proc in adapter_modules(unet).values():
        proc.register_forward_hook(lambda *_: calls.append(1))
    data = batch(4)
    plain = step.loss(unet, data, step=3, backward_scale=1.0)
    grads = [p.grad.clone() for p in params]
    plain_calls = len(calls)
    for p in params:
        p.grad = None
    unet.enable_gradient_checkpointing()
    checkpointed = step.loss(unet, data, step=3, backward_scale=1.0)
    assert len(calls) - plain_calls > plain_calls  # the adapters' blocks ran again during backward
    assert torch.allclose(checkpointed, plain, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_bf16_frozen_weights_train_fp32_adapters():
    step, unet, params = trainer(torch.bfloat16)
    loss = step.loss(unet, batch(2), step=0, backward_scale=1.0)
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
