"""Our cyclegan and pix2pix against the reference implementation's arithmetic (junyanz/pytorch-CycleGAN-and-pix2pix:
models/networks.py GANLoss, models/cycle_gan_model.py and models/pix2pix_model.py optimize_parameters), restated
here line by line from those files: from the same weights and batch, one step gives the same losses and weights.
And a penalty enters the critic's loss with the weight params give."""

import copy
import itertools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny, tiny_networks
from rich.console import Console
from torch import nn

from transfigure.models import objectives
from transfigure.models.generators import build_generator
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export.stage import export_checkpoint
from transfigure.pipeline.files import sha256_of_file
from transfigure.pipeline.params import load_params
from transfigure.pipeline.train import recipes
from transfigure.pipeline.train.checkpoint import load_checkpoint
from transfigure.pipeline.train.context import Context
from transfigure.pipeline.train.loop import train
from transfigure.pipeline.train.parts import critic_loss


class GANLoss(nn.Module):
    """The reference's GANLoss for 'lsgan' and 'vanilla': MSE or BCE-with-logits against a target of 1 or 0."""

    def __init__(self, gan_mode: str):
        super().__init__()
        self.loss = nn.MSELoss() if gan_mode == "lsgan" else nn.BCEWithLogitsLoss()

    def forward(self, prediction, target_is_real: bool):
        target = torch.tensor(1.0 if target_is_real else 0.0).expand_as(prediction)
        return self.loss(prediction, target)


def set_requires_grad(nets, flag):
    for net in nets:
        for param in net.parameters():
            param.requires_grad = flag


def reference_cyclegan_step(G_A, G_B, D_A, D_B, real_A, real_B, gan_mode, lambda_A, lambda_B, lambda_idt):
    """CycleGANModel.optimize_parameters with an empty pool (pool_size 0): G first, then both critics."""
    criterionGAN, L1 = GANLoss(gan_mode), nn.L1Loss()
    optimizer_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), lr=2e-4, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), lr=2e-4, betas=(0.5, 0.999))
    fake_B = G_A(real_A)
    rec_A = G_B(fake_B)
    fake_A = G_B(real_B)
    rec_B = G_A(fake_A)

    set_requires_grad([D_A, D_B], False)
    optimizer_G.zero_grad()
    loss_idt_A = L1(G_A(real_B), real_B) * lambda_B * lambda_idt
    loss_idt_B = L1(G_B(real_A), real_A) * lambda_A * lambda_idt
    loss_G_A = criterionGAN(D_A(fake_B), True)
    loss_G_B = criterionGAN(D_B(fake_A), True)
    loss_cycle_A = L1(rec_A, real_A) * lambda_A
    loss_cycle_B = L1(rec_B, real_B) * lambda_B
    loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
    loss_G.backward()
    optimizer_G.step()

    set_requires_grad([D_A, D_B], True)
    optimizer_D.zero_grad()

    def backward_D_basic(netD, real, fake):
        loss_D_real = criterionGAN(netD(real), True)
        loss_D_fake = criterionGAN(netD(fake.detach()), False)
        loss_D = (loss_D_real + loss_D_fake) * 0.5
        loss_D.backward()
        return loss_D

    loss_D_A = backward_D_basic(D_A, real_B, fake_B)
    loss_D_B = backward_D_basic(D_B, real_A, fake_A)
    optimizer_D.step()
    return {"G": loss_G, "D_A": loss_D_A, "D_B": loss_D_B}


def reference_pix2pix_step(netG, netD, real_A, real_B, gan_mode, lambda_L1):
    """Pix2PixModel.optimize_parameters: the critic first, then G against the updated critic."""
    criterionGAN, L1 = GANLoss(gan_mode), nn.L1Loss()
    optimizer_G = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    fake_B = netG(real_A)

    set_requires_grad([netD], True)
    optimizer_D.zero_grad()
    fake_AB = torch.cat((real_A, fake_B), 1)
    loss_D_fake = criterionGAN(netD(fake_AB.detach()), False)
    loss_D_real = criterionGAN(netD(torch.cat((real_A, real_B), 1)), True)
    loss_D = (loss_D_fake + loss_D_real) * 0.5
    loss_D.backward()
    optimizer_D.step()

    set_requires_grad([netD], False)
    optimizer_G.zero_grad()
    loss_G_GAN = criterionGAN(netD(fake_AB), True)
    loss_G = loss_G_GAN + L1(fake_B, real_B) * lambda_L1
    loss_G.backward()
    optimizer_G.step()
    return {"G": loss_G, "G_adv": loss_G_GAN, "D": loss_D}


def ours(name: str, objective: str, *extra: str):
    params = load_params("params.yaml", [*tiny_networks(name), f"{name}.objective={objective}", *extra])
    p = recipes.params_of(params, name)
    torch.manual_seed(0)
    ctx = Context.create(p)
    model = recipes.get(name)(p, ctx, Path(params.data.root) / p.dataset)
    batch = ctx.to_device(next(iter(model.batches(params.seed, 0))))  # uint8 pixels -> model input, as the loop does
    return model, batch


def biases_before_instance_norm(net: nn.Module) -> set[str]:
    """Conv biases that an instance norm right after subtracts again: their gradient is zero in exact arithmetic."""
    found = set()
    for prefix, module in net.named_modules():
        children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
        for (name, child), (_, after) in itertools.pairwise(children):
            if isinstance(child, nn.Conv2d | nn.ConvTranspose2d) and isinstance(after, nn.InstanceNorm2d):
                found.add(f"{prefix}.{name}.bias".lstrip("."))
    return found


def assert_same_weights(ours_net: nn.Module, reference_net: nn.Module) -> None:
    """To 1e-6. A bias before instance norm gets only rounding noise as its gradient (1e-8 here) in either
    implementation, and Adam's first step, g / (|g| + eps), makes a full step of +-lr out of any noise: those are
    checked to have no real gradient instead."""
    noise_only = biases_before_instance_norm(reference_net)
    for (name, a), (_, b) in zip(ours_net.named_parameters(), reference_net.named_parameters(), strict=True):
        if name in noise_only:
            assert a.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5, name
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective, gan_mode", [("lsgan", "lsgan"), ("nsgan", "vanilla")])
def test_cyclegan_step_is_the_references(workdir, objective, gan_mode):
    model, batch = ours("cyclegan", objective, "cyclegan.pool_size=0", "cyclegan.lambda_A=7", "cyclegan.lambda_B=3")
    nets = {name: copy.deepcopy(net) for name, net in model.state.nets.items()}
    losses = model.step(lambda: batch)
    # The reference calls G_AB "G_A" and the critic of domain B (which judges G_A's output) "D_A".
    expected = reference_cyclegan_step(
        nets["G_AB"], nets["G_BA"], nets["D_B"], nets["D_A"], batch["A"], batch["B"], gan_mode, 7.0, 3.0, 0.5
    )
    assert losses["G"] == pytest.approx(expected["G"].item(), abs=1e-6)
    assert losses["D_B"] == pytest.approx(expected["D_A"].item(), abs=1e-6)
    assert losses["D_A"] == pytest.approx(expected["D_B"].item(), abs=1e-6)
    for name in ("G_AB", "G_BA", "D_A", "D_B"):
        assert_same_weights(model.state.nets[name], nets[name])


@pytest.mark.parametrize("objective, gan_mode", [("lsgan", "lsgan"), ("nsgan", "vanilla")])
def test_pix2pix_step_is_the_references(workdir, objective, gan_mode):
    model, batch = ours("pix2pix", objective, "pix2pix.lambda_L1=50")
    nets = {name: copy.deepcopy(net) for name, net in model.state.nets.items()}
    losses = model.step(lambda: batch)
    expected = reference_pix2pix_step(nets["G"], nets["D"], batch["A"], batch["B"], gan_mode, 50.0)
    for key in ("G", "G_adv", "D"):
        assert losses[key] == pytest.approx(expected[key].item(), abs=1e-6), key
    assert_same_weights(model.state.nets["G"], nets["G"])
    assert_same_weights(model.state.nets["D"], nets["D"])


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere, so the penalty is known in closed form."""

    def __init__(self, norm: float):
        super().__init__()
        w = torch.randn(3 * 4 * 4, generator=torch.Generator().manual_seed(0))
        self.w = nn.Parameter(w / w.norm() * norm)

    def forward(self, x):
        return x.flatten(1) @ self.w


@pytest.mark.parametrize("name, weight, norm", [("wgan-gp", 10.0, 0.5), ("wgan-gp", 3.0, 2.0), ("wgan-lp", 7.0, 3.0)])
def test_the_penalty_enters_the_critic_loss_with_the_configured_weight(name, weight, norm):
    critic, objective = LinearCritic(norm), objectives.get(name, weight=weight)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    loss = critic_loss(objective, critic, real, fake)
    wasserstein = critic(fake).mean() - critic(real).mean()
    # 0.5 x (adversarial + penalty): the penalty's weight relative to the Wasserstein term is exactly `weight`.
    penalty = weight * (norm - 1) ** 2
    assert (2 * loss - wasserstein).item() == pytest.approx(penalty, rel=1e-5)


@pytest.mark.slow
def test_fine_tuning_starts_from_a_reference_generator_and_a_resumed_run_ignores_it(workdir):
    torch.manual_seed(3)
    reference = build_generator("resnet_2blocks", 3, 3, 8, "instance").eval()
    # As the reference saves it from DataParallel: every key under "module.".
    pth = workdir / "latest_net_G_A.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, pth)
    settings = [
        *tiny("cyclegan", steps=1, every=1),
        "cyclegan.generator.arch=resnet_2blocks",
        "cyclegan.generator.ngf=8",
        "cyclegan.lr=1e-12",  # one step that cannot move the weights: the export is the file's network
        f"cyclegan.init_from={{G_AB: {pth}}}",
    ]
    console = Console(record=True, width=300)
    train("cyclegan", load_params("params.yaml", settings), console)
    assert f"G_AB: initialised from {pth}" in console.export_text()
    checkpoint = workdir / "runs/cyclegan/checkpoints/last.pt"
    assert load_checkpoint(checkpoint)["init_from"] == {"G_AB": {"path": str(pth), "sha256": sha256_of_file(pth)}}
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("transfigure").experiment_id])[0]
    assert run.data.params["init_from_sha256.G_AB"] == sha256_of_file(pth)
    assert run.data.params["cyclegan.init_from.G_AB"] == str(pth)

    export_checkpoint(checkpoint, workdir / "model.onnx", fp16=False, console=Console(quiet=True))
    x = torch.rand(2, 3, 40, 28) * 2 - 1
    session = ort.InferenceSession(str(workdir / "model.AtoB.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], reference(x).numpy(), atol=1e-4)

    console = Console(record=True, width=300)
    train("cyclegan", load_params("params.yaml", [*settings, "cyclegan.steps=2"]), console)
    assert "init_from is ignored: resuming from the checkpoint" in console.export_text()

    wrong = [*settings[:-1], f"cyclegan.init_from={{G_BA: {pth}}}", "cyclegan.generator.arch=resnet_3blocks"]
    with pytest.raises(UserError, match=r"init_from.G_BA: latest_net_G_A.pth does not fit G_BA.*resnet_2blocks"):
        train("cyclegan", load_params("params.yaml", wrong), Console(quiet=True), fresh=True)
