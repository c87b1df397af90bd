//! virtio devices and the virtio-mmio transport they sit behind.
