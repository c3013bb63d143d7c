//! brats-model links libtorch: its rpath and link order, as every package that links it sets.
fn main() {
    brats_build::link_libtorch();
}
