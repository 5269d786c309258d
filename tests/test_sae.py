import torch

from dmsae_ray.algo.core import Core, build_sae
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE, group_sizes
from dmsae_ray.algo.trainer import SAETrainer, lr_lambda
from dmsae_ray.config import SAEConfig, TrainConfig

FRACS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]


def make(d=16, width=128, k=4, core=0, fracs=FRACS, budget="dynamic"):
    torch.manual_seed(0)
    return MatryoshkaBatchTopKSAE(d, width, k, core, group_fractions=fracs, l0_budget=budget)


def test_group_sizes_match_the_reference_split():
    assert group_sizes(65536, 0, FRACS) == [2048, 4096, 8192, 16384, 34816]
    sizes = group_sizes(65536, 197, FRACS)
    assert sum(sizes) == 65339 and sizes[0] == int(65339 / 32)
    # absolute boundaries: the core eats into G_0 and the total width is unchanged
    absolute = group_sizes(65536, 197, FRACS, mode="absolute")
    assert absolute[0] == 2048 - 197 and 197 + sum(absolute) == 65536


def test_no_core_single_group_is_plain_batchtopk():
    sae = make(core=0, fracs=[1.0])
    x = torch.randn(32, 16)
    out = sae.encode_train(x)
    post = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).flatten()
    ref = torch.zeros_like(post)
    vals, idx = post.topk(sae.k * 32)
    ref[idx] = vals
    torch.testing.assert_close(out.f.flatten(), ref)
    recon = sae.nested_reconstructions(out.f)
    assert len(recon) == 1
    torch.testing.assert_close(recon[0], out.f @ sae.W_dec + sae.b_dec)


def _train(sae, steps=30, d=16, seed=1, threshold_start=5):
    cfg = SAEConfig(
        width=sae.width, k=sae.k, threshold_start_step=threshold_start, dead_tokens=10_000
    )
    trainer = SAETrainer(
        sae, cfg, TrainConfig(tokens_per_cycle=steps * 64, batch_size=64, lr=1e-2, warmup_steps=0)
    )
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(40, d, generator=gen)
    metrics = []
    for _ in range(steps):
        codes = torch.relu(torch.randn(64, 40, generator=gen) - 1.0)
        metrics.append(trainer.step(codes @ mix))
    return metrics


def test_core_encoder_is_frozen_and_transfers_bit_identical():
    core = torch.randn(16, 5)
    sae = make(core=5)
    sae.set_core(core, torch.zeros(5, dtype=torch.long), torch.arange(5), tied=False)
    before_dec = sae.W_dec.detach().clone()
    _train(sae)
    assert torch.equal(sae.W_enc_core, core)  # bit-identical after training
    assert torch.equal(sae.W_enc[:, :5], core)
    assert not torch.equal(sae.W_dec, before_dec)  # the rest does train
    assert "W_enc_core" not in dict(sae.named_parameters())
    # across cycles: the next SAE receives exactly these columns, in the given order
    from dmsae_ray.config import RunConfig

    cfg = RunConfig.model_validate({"sae": {"width": 128, "k": 4}})
    order = [3, 0, 7, 1]
    nxt = build_sae(cfg, 16, cycle=2, core=Core.of(sae, order))
    assert torch.equal(nxt.W_enc_core, sae.W_enc[:, order].detach())
    assert torch.equal(nxt.W_enc_core[:, :2], core[:, [3, 0]])
    assert nxt.origin_index[:4].tolist() == order and nxt.origin_cycle[4:].eq(2).all()


def test_dynamic_budget_keeps_total_l0_at_k():
    sae = make(core=6, k=4)
    sae.set_core(torch.randn(16, 6), torch.zeros(6, dtype=torch.long), torch.arange(6), False)
    x = torch.randn(64, 16)
    out = sae.encode_train(x)
    total_l0 = (out.f > 0).sum(-1).float().mean()
    assert float(out.core_l0) > 0.5  # the core is active ...
    assert abs(float(total_l0) - 4) < 1e-6  # ... and the non-core budget shrinks to match
    fixed = make(core=6, k=4, budget="fixed")
    fixed.set_core(sae.W_enc_core, torch.zeros(6, dtype=torch.long), torch.arange(6), False)
    fixed.load_state_dict(sae.state_dict())
    out_fixed = fixed.encode_train(x)
    assert float((out_fixed.f > 0).sum(-1).float().mean()) > 4.5  # core L0 comes on top


def test_a_relu_core_overflows_the_budget_and_a_competing_core_cannot():
    x = torch.randn(64, 16)
    hot = torch.randn(16, 6)
    for mode in ("relu", "batchtopk"):
        sae = MatryoshkaBatchTopKSAE(16, 128, 4, 6, FRACS, core_activation=mode)
        sae.set_core(hot, torch.zeros(6, dtype=torch.long), torch.arange(6), False,
                     bias=torch.full((6,), 5.0))  # fires on (nearly) every token
        out = sae.encode_train(x)
        total = float((out.f > 0).sum(-1).float().mean())
        if mode == "relu":
            assert float(out.core_l0) > 5 and total == float(out.core_l0) > 4  # over k
        else:
            assert total == 4 and float(out.core_l0) <= 4  # k by construction


def test_core_bias_starts_at_zero_or_is_carried():
    from dmsae_ray.config import RunConfig

    core = Core(torch.randn(16, 3), [(0, 4), (1, 2), (0, 7)], torch.tensor([-0.5, 0.25, 1.0]))
    for how, expected in (("zero", torch.zeros(3)), ("carry", core.bias)):
        cfg = RunConfig.model_validate({"sae": {"width": 128, "k": 4, "core_bias": how}})
        sae = build_sae(cfg, 16, cycle=2, core=core)
        torch.testing.assert_close(sae.b_enc[:3].detach(), expected)
        assert not sae.b_enc[3:].any()  # every non-core bias is re-initialised


def test_from_config_takes_every_field_of_the_sae_section():
    cfg = SAEConfig(
        width=128, k=4, group_fractions=[0.25, 0.75], group_mode="absolute", l0_budget="fixed",
        bias_level=True, core_activation="batchtopk",
    )
    sae = MatryoshkaBatchTopKSAE.from_config(cfg, 16, core_size=3, cycle=2)
    assert sae.hparams() == {
        "d_in": 16, "width": 128, "k": 4, "core_size": 3,
        "groups": group_sizes(128, 3, [0.25, 0.75], mode="absolute"), "l0_budget": "fixed",
        "bias_level": True, "core_activation": "batchtopk",
    }
    assert sae.origin_cycle.eq(2).all()
    # the same initial weights as the constructor called by hand under the same seed
    torch.manual_seed(0)
    a = MatryoshkaBatchTopKSAE.from_config(cfg, 16, core_size=3, cycle=2)
    torch.manual_seed(0)
    b = MatryoshkaBatchTopKSAE(
        16, 128, 4, 3, [0.25, 0.75], "absolute", "fixed", True, 2, "batchtopk"
    )
    for (name, t_a), t_b in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(t_a, t_b), name


def test_training_keeps_l0_near_k_and_nested_mse_monotone():
    sae = make(core=0, k=4)
    metrics = _train(sae, steps=60)
    last = metrics[-1]
    assert abs(float(last["l0"]) - 4) < 0.5
    levels = last["level_mse"]
    assert torch.all(levels[1:] <= levels[:-1] + 1e-5), levels
    assert float(last["mse"]) < float(metrics[0]["mse"])
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert float(sae.threshold) > 0  # the inference threshold was learned
    x = torch.randn(8, 16)
    inf = sae.encode(x)
    assert torch.all((inf[:, sae.c :] == 0) | (inf[:, sae.c :] > sae.threshold))


def test_parallel_decoder_gradient_is_removed():
    sae = make()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    dots = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert dots.abs().max() < 1e-5


def test_aux_loss_only_on_dead_non_core_latents():
    sae = make(core=4)
    x = torch.randn(16, 16)
    enc = sae.encode_train(x)
    x_hat = sae.decode(enc.f)
    none_dead = torch.zeros(sae.width, dtype=torch.bool)
    assert float(sae.aux_loss(x, x_hat, enc.post, none_dead)) == 0
    sae.tokens_since_fired.fill_(10**9)
    dead = sae.dead_mask(1000)
    assert not dead[:4].any() and dead[4:].all()
    assert float(sae.aux_loss(x, x_hat, enc.post, dead).detach()) > 0


def test_lr_schedule_warms_up_and_decays_to_zero():
    fn = lr_lambda(100, 10, 0.8)
    assert fn(0) == 0.1 and fn(9) == 1.0 and fn(50) == 1.0
    assert fn(90) == 0.5 and fn(100) == 0.0


def test_metric_window_keeps_steps_on_device_until_asked():
    from dmsae_ray.algo.trainer import MetricWindow

    window = MetricWindow(size=2)
    for step in range(3):
        m = {k: torch.tensor(float(step)) for k in MetricWindow.KEYS}
        window.add(m)
    assert all(isinstance(row, torch.Tensor) for row in window.steps) and len(window.steps) == 2
    assert window.mean() == {k: 1.5 for k in MetricWindow.KEYS}  # steps 1 and 2
    assert "step 3/9 mse 2.0000" in window.line("", 3, 9) and "dead 2" in window.line("", 3, 9)
    assert MetricWindow(4).mean() == {}


def test_trainer_keeps_a_given_loss_module_even_if_it_is_falsy():
    from dmsae_ray.algo.trainer import SAELoss

    class Empty(SAELoss):  # what len()-having wrappers look like to `or`
        def __len__(self) -> int:
            return 0

    sae = make()
    cfg = SAEConfig(width=sae.width, k=sae.k)
    loss = Empty(sae, cfg)
    trainer = SAETrainer(sae, cfg, TrainConfig(tokens_per_cycle=64, batch_size=64), loss)
    assert trainer.loss_module is loss
