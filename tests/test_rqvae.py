"""RQ-VAE and SC encoder on tiny data: losses fall, parameters move, k-means and restarts help."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from a3gr.config import RQVAEConfig, SCConfig
from tokenize_jobs.rqvae import RQVAE, codebook_usage, kmeans
from tokenize_jobs.sc_encoder import SCTowers, u2i_auc, u2i_loss


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def clustered(n: int = 256, dim: int = 16, clusters: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 3
    return centres[torch.randint(clusters, (n,), generator=g)] + 0.1 * torch.randn(n, dim, generator=g)


def small_cfg(**overrides) -> RQVAEConfig:
    return RQVAEConfig(**{"levels": 2, "codebook_size": 8, "code_dim": 4, "hidden": 32, **overrides})


def test_rqvae_shapes_and_loss_parts():
    model = RQVAE(16, small_cfg())
    out = model(clustered(32))
    assert out.recon.shape == (32, 16)
    assert out.codes.shape == (32, 2) and out.codes.dtype == torch.long
    assert int(out.codes.max()) < 8
    assert torch.allclose(out.loss, out.recon_loss + out.commit_loss)
    assert torch.equal(model.encode(clustered(32)), out.codes)


def test_rqvae_training_lowers_loss_and_moves_every_parameter_group():
    x = torch.nn.functional.normalize(clustered(), dim=-1)  # unit vectors, like SC embeddings
    model = RQVAE(16, small_cfg())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        first = model(x)
    for _ in range(80):
        loss = model(x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = model(x)
    assert float(last.loss) < 0.5 * float(first.loss)
    assert float(last.recon_loss) < 0.25 * float(first.recon_loss)
    for name, value in model.state_dict().items():
        assert not torch.equal(before[name], value), f"{name} did not move"


def test_kmeans_init_reconstructs_better_than_random_codebooks():
    x = clustered()
    random_init = RQVAE(16, small_cfg())
    kmeans_init = RQVAE(16, small_cfg())
    kmeans_init.load_state_dict(random_init.state_dict())
    kmeans_init.kmeans_init(x)

    @torch.no_grad()
    def quantisation_error(model):
        z = model.latent(x)
        return float((model.quantize(z)[0] - z).pow(2).sum(-1).mean())

    assert quantisation_error(kmeans_init) < 0.5 * quantisation_error(random_init)
    assert len(np.unique(kmeans_init.encode(x).numpy(), axis=0)) >= 8


def test_kmeans_with_fewer_rows_than_codes_gives_distinct_centroids():
    x = torch.randn(3, 4)
    centroids = kmeans(x, 8)
    assert centroids.shape == (8, 4)
    assert len(torch.unique(centroids, dim=0)) == 8
    model = RQVAE(4, small_cfg())
    model.kmeans_init(x)  # must not fail with n < codebook_size
    assert torch.isfinite(model.codebooks).all()


def test_restart_dead_codes_revives_unused_codes():
    x = clustered()
    model = RQVAE(16, small_cfg(codebook_size=16))
    with torch.no_grad():
        model.codebooks[0].fill_(100.0)  # far from every residual: only one code can ever win
        model.codebooks[0][0].zero_()
    codes = model.encode(x).numpy()
    assert codebook_usage(codes, 16)[0]["used_fraction"] == 1 / 16
    counts = np.stack([np.bincount(codes[:, level], minlength=16) for level in range(2)])
    restarted = model.restart_dead_codes(x, counts)
    assert restarted >= 15
    assert codebook_usage(model.encode(x).numpy(), 16)[0]["used_fraction"] > 0.25


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    x = clustered(64)
    model = RQVAE(16, small_cfg())
    model.kmeans_init(x)
    model.save(tmp_path / "rq")
    assert sorted(p.name for p in (tmp_path / "rq").iterdir()) == ["config.json", "model.safetensors"]
    loaded = RQVAE.load(tmp_path / "rq")
    assert loaded.cfg == model.cfg and loaded.input_dim == 16
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_codebook_usage_reports_fraction_and_perplexity():
    codes = np.array([[0, 1], [1, 1], [2, 1], [3, 1]])
    usage = codebook_usage(codes, 4)
    assert usage[0] == {"used_fraction": 1.0, "perplexity": pytest.approx(4.0)}
    assert usage[1] == {"used_fraction": 0.25, "perplexity": pytest.approx(1.0)}


def toy_pairs(n_users: int = 64, n_items: int = 32, dim: int = 12, seed: int = 0):
    """Users and items in 4 groups; a user's positives are items of its own group."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, dim, generator=g)
    user_group = torch.arange(n_users) % 4
    item_group = torch.arange(n_items) % 4
    users = centres[user_group] + 0.3 * torch.randn(n_users, dim, generator=g)
    items = centres[item_group] + 0.3 * torch.randn(n_items, dim, generator=g)
    pos = torch.stack([torch.nonzero(item_group == grp).flatten()[torch.randint(n_items // 4, (1,), generator=g)]
                       for grp in user_group]).flatten()
    neg = (pos + 1) % n_items  # the next item is always in another group
    return users, items, pos, neg


def test_u2i_training_lowers_loss_and_separates_positives():
    users, items, pos, neg = toy_pairs()
    # the item features are a different view than the user features: a random rotation
    items = items @ torch.linalg.qr(torch.randn(12, 12))[0]
    towers = SCTowers(12, 12, SCConfig(dim=8, hidden=32))
    before = {k: v.detach().clone() for k, v in towers.state_dict().items()}
    optimizer = torch.optim.Adam(towers.parameters(), lr=1e-2)

    def step_loss():
        sampled = torch.randint(len(items), (8,))
        return u2i_loss(towers.user(users), towers.item(items[pos]), towers.item(items[sampled]), 0.1,
                        pos_ids=pos, neg_ids=sampled)

    with torch.no_grad():
        first = float(step_loss())
        auc_before = u2i_auc(towers.user(users), towers.item(items[pos]), towers.item(items[neg]))
    for _ in range(60):
        loss = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(step_loss())
        auc_after = u2i_auc(towers.user(users), towers.item(items[pos]), towers.item(items[neg]))
    assert last < first
    assert auc_after > 0.9 and auc_after > auc_before
    for name, value in towers.state_dict().items():
        assert not torch.equal(before[name], value), f"{name} did not move"


def test_u2i_loss_masks_repeated_positives():
    u = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    v_same = torch.cat([v[:1], v[:1], v[2:]])  # rows 0 and 1 share their positive item
    ids = torch.tensor([5, 5, 7])
    empty = torch.zeros(0, 4)
    masked = u2i_loss(u, v_same, empty, 1.0, pos_ids=ids)
    logits = u @ v_same.T
    expected = torch.stack([
        -torch.log_softmax(logits[0, [0, 2]], 0)[0],
        -torch.log_softmax(logits[1, [1, 2]], 0)[0],
        -torch.log_softmax(logits[2], 0)[2]]).mean()
    assert torch.allclose(masked, expected)


def test_u2i_auc_counts_ties_half_and_accepts_several_negatives():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v_pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v_neg = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert u2i_auc(u, v_pos, v_neg) == pytest.approx(0.75)
    assert u2i_auc(u, v_pos, torch.stack([v_neg, -v_pos], dim=1)) == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_sc_towers_save_load_round_trip(tmp_path):
    towers = SCTowers(6, 5, SCConfig(dim=4, hidden=8))
    towers.save(tmp_path / "sc")
    loaded = SCTowers.load(tmp_path / "sc")
    x_u, x_i = torch.randn(3, 6), torch.randn(3, 5)
    assert torch.equal(loaded.user(x_u), towers.user(x_u)) and torch.equal(loaded.item(x_i), towers.item(x_i))
    assert torch.allclose(loaded.user(x_u).norm(dim=-1), torch.ones(3))
