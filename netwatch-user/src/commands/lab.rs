use anyhow::{Result, bail};

use crate::cli::LabArgs;

pub fn lab(_args: &LabArgs) -> Result<()> {
    bail!("lab: not yet")
}
