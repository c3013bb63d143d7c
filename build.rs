//! Link flags for libtorch (tch issue #980), shared through `brats-build`.

fn main() {
    brats_build::link_libtorch();
}
