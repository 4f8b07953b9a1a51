import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.evaluation.gpu_metrics import psnr, ssim, to_float


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (7, 9)])
def test_matches_scikit_image(size):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (6, *size, 3), dtype=np.uint8)
    noise = rng.normal(0, rng.uniform(2, 60, (6, 1, 1, 1)), truth.shape)
    prediction = np.clip(truth + noise, 0, 255).astype(np.uint8)
    ours_ssim = ssim(to_float(prediction), to_float(truth)).numpy()
    ours_psnr = psnr(to_float(prediction), to_float(truth)).numpy()
    for i in range(len(truth)):
        reference = structural_similarity(truth[i], prediction[i], channel_axis=-1, data_range=255)
        assert abs(ours_ssim[i] - reference) < 1e-4
        assert abs(ours_psnr[i] - peak_signal_noise_ratio(truth[i], prediction[i], data_range=255)) < 1e-4
