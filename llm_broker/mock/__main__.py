from llm_broker.mock.server import main

raise SystemExit(main())
