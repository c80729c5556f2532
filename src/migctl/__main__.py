from migctl.main import main

main()
