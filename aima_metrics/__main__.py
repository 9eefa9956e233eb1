from aima_metrics.cli import main

main()
