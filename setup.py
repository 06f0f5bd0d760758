"""The one compiled part: region-of-interest JPEG decoding against the system's libjpeg(-turbo).

Optional: where libjpeg's headers are missing (Debian: `apt-get install libjpeg62-turbo-dev`) the
build is skipped and decoding falls back to Pillow (coatnet_scale/data/roi_jpeg.py says which one
runs). Everything else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "coatnet_scale.data._roi_jpeg",
            sources=["coatnet_scale/data/_roi_jpeg.c"],
            libraries=["jpeg"],
            optional=True,
        )
    ]
)
