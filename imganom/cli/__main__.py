from imganom.cli.main import main

main()
