use std::path::Path;

use anyhow::Result;

use crate::datapath::detach_all;

pub fn detach(pin_dir: &Path) -> Result<()> {
    let removed = detach_all(pin_dir)?;
    if removed == 0 {
        println!("nothing to detach: {} holds no netwatch pins", pin_dir.display());
    } else {
        println!("detached: removed {removed} pins and {}", pin_dir.display());
    }
    Ok(())
}
