from spec_lightning.cli import main

main()
