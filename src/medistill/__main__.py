from medistill.cli import main

main()
