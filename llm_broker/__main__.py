from llm_broker.cli import main

raise SystemExit(main())
