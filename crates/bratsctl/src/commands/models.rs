//! `bratsctl models`: the models an inference service knows.

use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;

use super::status_line;

/// Arguments of `bratsctl models`.
#[derive(clap::Args)]
pub(crate) struct ModelsArgs {
    /// Inference service address.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    server: String,
}

/// Prints each model with its versions (the loaded ones marked) and aliases.
pub(crate) async fn run(a: ModelsArgs) -> anyhow::Result<()> {
    let server = a.server;
    let mut c = InferenceClient::new(super::connect(&server).await?);
    for m in c.list_models(pb::ListModelsRequest::default()).await.map_err(|s| status_line(&s))?.into_inner().models {
        let aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}→{v}")).collect();
        println!(
            "{}  versions {}  aliases {}",
            m.name,
            m.versions
                .iter()
                .map(|v| if v.loaded { format!("{} (serving)", v.version) } else { v.version.clone() })
                .collect::<Vec<_>>()
                .join(", "),
            aliases.join(", ")
        );
    }
    Ok(())
}
