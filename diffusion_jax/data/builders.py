"""The dataset builders, by the name configs use.

None of them is registered with tfds (`skip_registration=True`): tfds raises if a second class
claims a registered name, which would make importing this package fail next to tfds's own
`cifar10`, a user's `mnist5k`, or a module imported twice (notebook reloads). Registration buys
nothing here because builders are never looked up by name through tfds (`tfds.load` needs TF);
`load_split` instantiates these classes directly.
"""

from diffusion_jax.data.cifar10 import Cifar10Manual
from diffusion_jax.data.digits import Digits
from diffusion_jax.data.folder import ImageFolder
from diffusion_jax.data.mnist5k import Mnist5k

BUILDERS = {
    "mnist5k": Mnist5k,
    "digits": Digits,
    "cifar10": Cifar10Manual,
    # The builder's own tfds name (its directory under data_dir) works too.
    "cifar10_manual": Cifar10Manual,
    # A user's directory of images (data.folder); needs a `folder.folder_config` builder config.
    "folder": ImageFolder,
}
