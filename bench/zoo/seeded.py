"""The seeded zoo entries, pinned: the only manifests that may say ``verified: false`` (no sha256 yet).

These are the public checkpoints their authors and the Adversarial Pruning Benchmark (APB,
https://github.com/pralab/AdversarialPruningBenchmark) list: the APB's MAD, PwoA, RAP-ADMM and HYDRA files, HYDRA's
own releases (https://github.com/inspire-group/hydra) and RobustBench's ``Sehwag2020Hydra``.
Nobody could compute their sha256 when they were added, so they are trusted on first download
(:mod:`bench.zoo.fetch` records the hash). Pinning each one's URL here, in code, means a pull request that only
edits ``submissions/`` can neither add an unverified entry nor point a seeded one at another file: either change
shows up as a change to this file. ``None``: no direct URL is known (fetch the file by hand, ``--from FILE``).
"""

from __future__ import annotations

SEEDED: dict[str, str | None] = {
    "Dense_Sehwag2020Hydra_V16_CIFAR10_US_0": None,
    "Dense_Sehwag2020Hydra_WRN28x4_CIFAR10_US_0": None,
    "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1uHEhTIZdE4bzRY8HWw4SoQX5RhyCZgtP",
    "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1GQoBSGMKmB49b7PGt9a4e71W0F7uqI4Q",
    "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1eETCDsxldOGesU7ue0WfJtJoAu8UBg0j",
    "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=10p5A_oUgGLK4dls7NmSN7QkrzkneidsL",
    "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors": None,
    "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1sFEen7Sk5iO5yeoOtOUnQ3hbkivfKKlX",
    "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_95_Authors": None,
    "HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_99_Authors": None,
    "HYDRA_Sehwag2020Hydra_WRN28x10_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1pi8GHwAVkxVH41hEnf0IAJb_7y-Q8a2Y",
    "HYDRA_Sehwag2020Hydra_WRN28x4_CIFAR10_US_90_Authors": None,
    "HYDRA_Sehwag2020Hydra_WRN28x4_CIFAR10_US_95_Authors": None,
    "HYDRA_Sehwag2020Hydra_WRN28x4_CIFAR10_US_99_Authors": None,
    "MAD_Lee2022Masking_R18_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1EgSapjAalnFliwnZVEH_e1u5PVurXly6",
    "MAD_Lee2022Masking_R18_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1_nI7KrLl04Pg6s1hRX-NR_1rb7leX1tR",
    "MAD_Lee2022Masking_R18_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1ahRtT2_ZZ79CgZyeukDWNJBRTa9Jb25X",
    "MAD_Lee2022Masking_V16_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1rO-gk8a56Bt4B72IZmt4dltRfXn6B8xz",
    "MAD_Lee2022Masking_V16_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1r7CHQ9AMiUlMwbMHZZnDRmqqPLDyG9kT",
    "MAD_Lee2022Masking_V16_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1-_ADHwYYnYtXWrx16aagVWqtqMqcR2Z3",
    "PwoA_Jian2022Pruning_R18_CIFAR10_S_50": "https://drive.google.com/uc?export=download&id=1eg_8R7COqRBhogspblM6UjMM6kB8Uq0h",
    "PwoA_Jian2022Pruning_R18_CIFAR10_S_75": "https://drive.google.com/uc?export=download&id=1ZH_PlIGJbMDjyJEG9eFKWNQ3VrsUC_KK",
    "PwoA_Jian2022Pruning_R18_CIFAR10_S_90": "https://drive.google.com/uc?export=download&id=1Tjl9i9Ff75pmUVGAwo70DtWhWFWc42ec",
    "PwoA_Jian2022Pruning_R18_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1BI6spbKnO8GGR1M_1YovP5x_I6LJLhR4",
    "PwoA_Jian2022Pruning_R18_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=154rf1FaPGCjMVYnr-li_rp2liiq_KOqz",
    "PwoA_Jian2022Pruning_R18_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1vMm-UswjNtS0Gxv1kMDlGpTXytnkJx19",
    "PwoA_Jian2022Pruning_V16_CIFAR10_S_50": "https://drive.google.com/uc?export=download&id=1HzvnKeV7z1KCvNEeSZWGyqDDZIF-iHi0",
    "PwoA_Jian2022Pruning_V16_CIFAR10_S_75": "https://drive.google.com/uc?export=download&id=1y84GfJl42Hu7ldOS5asMwOS15dNwKBb1",
    "PwoA_Jian2022Pruning_V16_CIFAR10_S_90": "https://drive.google.com/uc?export=download&id=1292UuwvQRkCrFS5i4YypMtTDINGFxdjS",
    "PwoA_Jian2022Pruning_V16_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=1VmBkyYixjfaxDURWPfe9hdG_ivInVyDi",
    "PwoA_Jian2022Pruning_V16_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=13pd9inJUD2ZNh-iME8OHzAhCe7_Nh7fK",
    "PwoA_Jian2022Pruning_V16_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1e67vAfiYiQTLAwfcm_zj20Px8kBhBU8w",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_S_50": "https://drive.google.com/uc?export=download&id=1BHmWgqZtfdb5xRuPCLW_yNPnhY9m1FHn",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_S_75": "https://drive.google.com/uc?export=download&id=1jHyzfvzTzlybVDrSEBbITt9PGrqnrGtv",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_S_90": "https://drive.google.com/uc?export=download&id=1MQPb00KEtI-Vmic8434x3hfy-5RqE3o3",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=11IuB65-LKURDldvIr1GpE5tiIi3oVguY",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1E9cLxZHWGuaWD7vjGDA-1pLWxFxmFVXF",
    "RADMM_Ye2019Adversarial_R18_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1FoSKPFglGrtfFzpPQxe78EW0IZwcTg6Z",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_S_50": "https://drive.google.com/uc?export=download&id=1LiF9OK9Wtugs53oXe_hwXEX9KxYDFZql",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_S_75": "https://drive.google.com/uc?export=download&id=1MwetqmheKL1jJnH29AhuGBnjQOChQLej",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_S_90": "https://drive.google.com/uc?export=download&id=1-AYZI56rV86IY83PLzyOfGxanD0MfCmg",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_US_90": "https://drive.google.com/uc?export=download&id=17y3kyuseYyYRKjqEHuHTPumLXo3pYJ1V",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_US_95": "https://drive.google.com/uc?export=download&id=1dMt1wpmS-Zk6aOuSn9kmWJnqWCOd3M-2",
    "RADMM_Ye2019Adversarial_V16_CIFAR10_US_99": "https://drive.google.com/uc?export=download&id=1LwS_T7obft8mDgGyEr6-g8aOIXZUkH3o",
}
