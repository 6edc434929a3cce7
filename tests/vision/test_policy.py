"""The classifier policy: the abstain action starts at its initial probability without moving the class
distribution, actions are drawn reproducibly, and the KL to the reference is over the classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.vision.config import ModelParams
from pipeline_lib.vision.models.classifier import AbstainClassifier, attach_head
from pipeline_lib.vision.models.factory import build_encoder
from pipeline_lib.vision.policy import ClassifierPolicy, class_kl, log_policy, sample_actions


@pytest.fixture(params=["vit", "resnet18"])
def classifier(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ModelParams(name=request.param, patch_size=2 if request.param == "vit" else None, embed_dim=32,
                        depth=2, num_heads=2)
    network = attach_head(build_encoder(model, in_chans=1, img_size=8), 10)
    torch.nn.init.normal_(network.get_classifier().weight, std=1.0)  # confident, varied class logits
    return network.eval()


def test_abstain_starts_at_init_prob_and_leaves_the_classes_as_they_were(classifier: torch.nn.Module) -> None:
    images = torch.randn(6, 1, 8, 8)
    policy = AbstainClassifier(classifier, init_prob=0.02).eval()
    with torch.no_grad():
        reference, logits = classifier(images), policy(images)
    assert logits.shape == (6, 11)
    probs = torch.softmax(logits, dim=1)
    assert torch.allclose(probs[:, 10], torch.full((6,), 0.02), atol=1e-6)
    assert torch.allclose(probs[:, :10] / probs[:, :10].sum(1, keepdim=True), torch.softmax(reference, 1), atol=1e-6)
    assert torch.allclose(class_kl(logits, reference), torch.zeros(6), atol=1e-6)


def test_abstain_logit_learns_from_the_features(classifier: torch.nn.Module) -> None:
    policy = AbstainClassifier(classifier).eval()
    loss = -log_policy(policy(torch.randn(4, 1, 8, 8)))[:, 10].mean()  # push towards abstaining
    loss.backward()
    assert policy.abstain.weight.grad.abs().sum() > 0 and policy.abstain.bias.grad.abs().sum() > 0


def test_sampling_follows_the_policy_and_the_uniforms() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    uniforms = torch.rand(2, 20_000, generator=torch.Generator().manual_seed(3))
    actions = sample_actions(probs.log(), uniforms)
    assert actions.shape == (2, 20_000)
    assert torch.allclose(F.one_hot(actions[0], 3).float().mean(0), probs[0], atol=0.01)
    assert (actions[1] == 2).all()  # zero-probability actions are never drawn
    edges = torch.tensor([[0.0, 0.69, 0.7, 0.89, 0.9, 0.9999]])
    assert sample_actions(probs[:1].log(), edges).tolist() == [[0, 0, 1, 1, 2, 2]]
    rows = slice(1, None)  # one process's rows of the global batch draw what the whole batch drew there
    assert torch.equal(sample_actions(probs[rows].log(), uniforms[rows]), actions[rows])


def test_class_kl_by_hand_and_with_temperature() -> None:
    policy = torch.log(torch.tensor([[0.5, 0.5, 9.0]]))  # third column: an extra action, dropped
    reference = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert class_kl(policy, reference).item() == pytest.approx(expected.item(), rel=1e-6)
    assert class_kl(reference, reference, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_classifier_policy_kl_is_k3_over_the_classes_and_zero_for_abstain() -> None:
    policy = ClassifierPolicy(torch.eye(3, 2), group_size=3, temperature=1.0)  # 2 classes + abstain
    log_probs = torch.log(torch.tensor([[0.3, 0.5, 0.2]]))  # (1, A): renormalised classes 0.375, 0.625
    reference = torch.log(torch.tensor([[0.5, 0.5]]))  # (1, C)
    actions = torch.tensor([[0, 1, 2]])
    kl = policy.kl(policy.scored(log_probs, actions), policy.scored(reference, actions), {"actions": actions})
    ratio = torch.tensor([0.5 / 0.375, 0.5 / 0.625])  # reference / policy at the class actions
    assert torch.allclose(kl[0, :2], ratio - ratio.log() - 1, atol=1e-6)
    assert kl[0, 2] == 0  # the reference defines no abstain: no KL term
    assert policy.scored(log_probs, actions).logp.tolist() == log_probs.gather(1, actions).tolist()


def test_bad_init_prob_is_refused(classifier: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"init_prob=1\.0"):
        AbstainClassifier(classifier, init_prob=1.0)


def test_abstain_classifier_saves_and_loads(classifier: torch.nn.Module, tmp_path) -> None:
    from pipeline_lib.vision.models.factory import CLASSIFIER_FILE, load_network, save_network
    from pipeline_lib.vision.models.preprocess import Preprocess

    policy = AbstainClassifier(classifier).eval()
    torch.nn.init.normal_(policy.abstain.weight)
    model = ModelParams(name="vit", patch_size=2, embed_dim=32, depth=2, num_heads=2) if hasattr(
        classifier, "patch_embed") else ModelParams(name="resnet18", patch_size=None)
    config = save_network(policy, Preprocess([0.5], [0.25], 8), model, tmp_path, in_chans=1, weights=CLASSIFIER_FILE)
    assert config["abstain"] is True and config["num_classes"] == 10
    loaded, _, _ = load_network(tmp_path)
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(images), policy(images), atol=1e-6)
    assert isinstance(loaded, AbstainClassifier)
