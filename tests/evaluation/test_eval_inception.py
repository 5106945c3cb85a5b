"""The FID Inception-v3 port: TF1 resize, feature taps, weight loading and its errors (random weights only)."""
import numpy as np
import pytest
import torch

from evaluation.inception import INCEPTION_WEIGHTS_NAME, InceptionV3FID, TinyExtractor, load_inception, resize_bilinear_tf1


def tf1_resize_ref(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Scalar-loop TF1 resize_bilinear(align_corners=False) for one [H, W] image (float64)."""
    h, w = img.shape
    out = np.empty((oh, ow))
    for y in range(oh):
        sy = y * h / oh
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(ow):
            sx = x * w / ow
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bot * fy
    return out


@pytest.mark.parametrize("src,dst", [((7, 5), (13, 11)), ((20, 9), (6, 17)), ((8, 8), (8, 8))])
def test_resize_bilinear_tf1_matches_scalar_reference(src, dst):
    img = np.random.default_rng(0).uniform(0, 255, src)
    got = resize_bilinear_tf1(torch.from_numpy(img)[None, None], dst)[0, 0].numpy()
    np.testing.assert_allclose(got, tf1_resize_ref(img, *dst), rtol=1e-12, atol=1e-10)


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = InceptionV3FID()
    for m in net.modules():  # non-trivial BN statistics so the taps are not all equal
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inc") / INCEPTION_WEIGHTS_NAME
    sd = net.state_dict()
    sd["AuxLogits.fc.weight"] = torch.zeros(3)   # torchvision-style exports carry an aux head: ignored
    torch.save(sd, path)
    return str(path)


def test_inception_loads_weights_and_exposes_adm_features(random_inception_file):
    net = load_inception(random_inception_file)
    captured = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))
    imgs = torch.randint(0, 256, (2, 3, 40, 72), dtype=torch.uint8)     # non-square input, resized to 299x299
    f = net(imgs)
    assert f["pool"].shape == (2, 2048) and f["logits"].shape == (2, 1008) and f["spatial"].shape == (2, 2023)
    # sFID tap: Mixed_6d's 1x1 branch after ReLU, first 7 channels, flattened (h, w, c) like TF's NHWC.
    b1 = captured["b1"]
    assert b1.shape == (2, 192, 17, 17)
    torch.testing.assert_close(f["spatial"], b1[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    # IS logits have no bias (ADM's softmax graph multiplies pool_3 by the weights only).
    torch.testing.assert_close(f["logits"], f["pool"] @ net.fc.weight.T)
    assert (f["pool"] >= 0).all()   # mean of ReLU outputs


def test_inception_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_NAME):
        load_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        load_inception(None)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not FID Inception-v3 weights"):
        load_inception(str(bad))
    with pytest.raises(ValueError, match="uint8"):
        InceptionV3FID()(torch.zeros(1, 3, 8, 8))


def test_tiny_extractor_is_deterministic():
    imgs = torch.randint(0, 256, (3, 3, 24, 40), dtype=torch.uint8)
    a, b = TinyExtractor()(imgs), TinyExtractor()(imgs)
    for k, d in TinyExtractor.dims.items():
        assert a[k].shape == (3, d)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_matches_torch_fidelity_inception(random_inception_file, tmp_path):
    """Same weights through torch-fidelity's extractor (claimed TF-exact): pool and bias-free logits agree."""
    tf_ext = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    clean = str(tmp_path / "clean.pth")   # torch-fidelity loads strictly: without the aux-head key
    torch.save({k: v for k, v in torch.load(random_inception_file).items() if not k.startswith("AuxLogits.")}, clean)
    theirs = tf_ext.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=clean)
    ours = load_inception(random_inception_file)
    imgs = torch.randint(0, 256, (2, 3, 48, 80), dtype=torch.uint8)
    pool, logits = theirs(imgs)
    f = ours(imgs)
    torch.testing.assert_close(f["pool"], pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f["logits"], logits, rtol=1e-4, atol=1e-4)
