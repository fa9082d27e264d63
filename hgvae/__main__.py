from hgvae.cli import main

raise SystemExit(main())
