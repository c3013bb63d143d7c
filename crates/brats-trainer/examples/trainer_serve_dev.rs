//! TEMPORARY (helper's development scaffold, removed before hand-over): `serve --config PATH`.
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    brats_service::init_logging("info", false);
    let cfg = brats_trainer::config::TrainerConfig::load(Some(std::path::Path::new(&args[3]))).unwrap();
    brats_service::run_main(brats_trainer::server::serve(cfg, brats_service::shutdown_signal(), None))
}
