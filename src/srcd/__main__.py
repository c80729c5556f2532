from srcd.main import main

main()
