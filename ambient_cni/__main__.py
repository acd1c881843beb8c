from ambient_cni.main import main

main()
