"""Training augmentation that is a function of (seed, epoch, sample index) alone.

FFCV's own ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from
numba's per-thread random state, so which crop an image gets depends on which loader
thread decodes it and what that thread drew before: two runs of one job differ
(ffcv#164, #300, #392). FFCV hands a decoder the dataset indices of its batch (and an
operation with ``with_indices``), which is what makes per-sample seeding possible: here
every sample re-seeds its thread's generator from ``key(seed, epoch, index)`` before it
draws its crop, and the flip does the same with its own salt, so no draw depends on
scheduling, batch composition, Ray Train's rank or the number of loader threads.

The epoch reaches the compiled code through an ``EpochCell``: numba freezes the arrays a
compiled function closes over, so the loader writes the epoch into a one-element array
whose address the code reads at the start of every batch.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop, imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import types
from numba.extending import intrinsic

CROP, FLIP = 0x5BD1E995, 0x27D4EB2F  # salts: the crop's and the flip's draws are independent


class EpochCell:
    """The epoch a loader is in, where compiled pipeline code can read it."""

    def __init__(self):
        self.value = np.zeros(1, dtype=np.int64)  # kept alive by the cell: the code holds its address
        self.address = int(self.value.ctypes.data)

    def set(self, epoch: int) -> None:
        self.value[0] = int(epoch)


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at ``address`` (read at run time, not frozen at compile time)."""
    sig = types.int64(types.intp)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
        return builder.load(ptr)

    return sig, codegen


def key(seed, epoch, index, salt):
    """A 32-bit seed from (seed, epoch, index, salt): each term spread by an odd multiplier
    (in int64, exact for seeds, epochs and indices below 2**31), then mixed."""
    h = (
        (np.int64(seed) * np.int64(0x9E3779B1))
        ^ (np.int64(epoch) * np.int64(0x85EBCA77))
        ^ (np.int64(index) * np.int64(0xC2B2AE3D))
        ^ np.int64(salt)
    )
    h ^= h >> np.int64(15)
    return h & np.int64(0xFFFFFFFF)


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder (same decoding, crop rule and resize), each
    sample's crop drawn from ``key(seed, epoch, index)``."""

    def __init__(self, output_size, cell: EpochCell, seed: int, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)):
        super().__init__(output_size)
        self.cell, self.seed, self.scale, self.ratio = cell, int(seed), scale, ratio

    @property
    def get_crop_generator(self):
        return get_random_crop

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, key_c = Compiler.compile(get_random_crop), Compiler.compile(key)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        address, seed = self.cell.address, self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = _load_int64(address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                np.random.seed(key_c(seed, epoch, source_ix, CROP))  # this thread's generator, for this sample
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """FFCV's horizontal flip (probability ``flip_prob``), each sample's coin drawn from
    ``key(seed, epoch, index)``; an operation ``with_indices``."""

    def __init__(self, cell: EpochCell, seed: int, flip_prob: float = 0.5):
        super().__init__()
        self.cell, self.seed, self.flip_prob = cell, int(seed), flip_prob

    def generate_code(self):
        my_range, key_c = Compiler.get_iterator(), Compiler.compile(key)
        address, seed, flip_prob = self.cell.address, self.seed, self.flip_prob

        def flip(images, dst, indices):
            epoch = _load_int64(address)
            for i in my_range(images.shape[0]):
                np.random.seed(key_c(seed, epoch, indices[i], FLIP))
                if np.random.random() < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
