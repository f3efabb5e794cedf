"""Taylor criterion: the first-order estimate (gamma g_gamma + beta g_beta)^2, checked by hand."""

import torch
import torch.nn.functional as F
from tiny_models import Tiny

from toolchain.ranking import CRITERIA, RankContext, load_criteria
from toolchain.stages.prune import find_prunable_layers


def test_taylor_scores_equal_a_plain_autograd_computation():
    load_criteria()
    torch.manual_seed(0)
    model = Tiny().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    layers = find_prunable_layers(model, torch.zeros(2, 3, 8, 8))
    images, labels = torch.randn(64, 3, 8, 8), torch.arange(64) % 3
    got = CRITERIA.get("taylor")(RankContext(model=model, layers=layers, images=images, labels=labels,
                                             num_classes=3, device=torch.device("cpu")))
    bn = model.features[5]  # the BN after features.4
    want = torch.zeros(bn.num_features, dtype=torch.float64)
    for a in (0, 32):
        model.zero_grad()
        F.cross_entropy(model(images[a:a + 32]), labels[a:a + 32]).backward()
        want += ((bn.weight * bn.weight.grad + bn.bias * bn.bias.grad).double().detach()) ** 2
    want /= 2
    torch.testing.assert_close(torch.tensor(got["features.4"].scores, dtype=torch.float64), want)
    assert got["features.4"].order == torch.argsort(-want, stable=True).tolist()
