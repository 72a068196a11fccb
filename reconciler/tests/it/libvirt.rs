//! Real libvirt.
